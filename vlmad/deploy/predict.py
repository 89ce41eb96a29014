"""Predict on new images: ``vlmad predict method=winclip input=img_or_folder class_name=bottle ...``.

Writes into the run directory what evaluation writes for its test images: ``predictions.csv`` (evaluation's
columns, ``vlmad.outputs.predictions.PREDICTION_COLUMNS``; no label: these images have none), a labelled panel per
image in ``heatmaps/<class_name>/<stem>.png`` (image | heatmap | ground truth: none | prediction, colour bar on
this run's p1-p99 map scale), ``report.html``, plus ``masks/<stem>.png`` (0/255 at the pixel threshold, at the
image's own size), ``threshold.json`` and ``skipped.txt`` (unreadable or unsupported files, with the reason). A
folder that already holds ``predictions.csv`` is refused: nothing is overwritten. Thresholds come from normal
images only: given (``threshold.value``), loaded (``threshold.file`` or ``<ckpt_path>.threshold.json``) or
calibrated as a quantile of the scores of a folder of normal images (``threshold.calibration.dir``).
``backend=onnx|openvino model=DIR`` scores with a folder written by ``vlmad export`` (:mod:`vlmad.deploy`) and
never imports torch: that path runs on an inspection box with only numpy, Pillow, onnxruntime or openvino
(and hydra-core for this command).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from vlmad.config import CONF_DIR as CONF
from vlmad.deploy import runtime
from vlmad.errors import exit_on_user_error
from vlmad.io import atomic_write_json
from vlmad.logs import quiet, to_log_file
from vlmad.outputs.heatmaps import colour_scale, display_size, render_panel, resize_array, save_png
from vlmad.outputs.html import write_predict_report
from vlmad.outputs.predictions import MAP_SAMPLE, PREDICTION_COLUMNS, SCALE_PERCENTILES, ThresholdError, decision

if TYPE_CHECKING:  # the torch backend imports torch where it is used: the exported path must run without it
    import torch
    from torch import Tensor

    from vlmad.data import Preprocess
    from vlmad.data.references import ReferenceDraw
    from vlmad.methods.base import AnomalyMethod

log = logging.getLogger(__name__)


PREDICT_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
THRESHOLD_KEYS = ("image_threshold", "pixel_threshold")
NO_THRESHOLD = (
    "no threshold: give one of threshold.value=<image score threshold>, threshold.file=<threshold.json of an "
    "earlier run>, or threshold.calibration.dir=<folder of NORMAL images, e.g. <category>/train/good> "
    "(or calibrate once with ckpt_path set, which writes <ckpt_path>.threshold.json for later runs)"
)


class PredictError(ThresholdError):
    """Bad prediction input or threshold settings."""


# ------------------------------------------------------------------ inputs
def list_inputs(path: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images to score: a file, or a folder's files (not recursive, sorted by name).

    Returns:
        the supported image files; (path, reason) for the files skipped for their extension.
    """
    path = Path(path)
    if not path.exists():
        raise PredictError(f"input not found: {path}")
    files = [path]
    if path.is_dir():  # hidden files (.DS_Store, ...) are not inputs
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    exts = ", ".join(PREDICT_EXTS)
    images = [p for p in files if p.suffix.lower() in PREDICT_EXTS]
    skipped = [(p, f"unsupported extension (expected one of {exts})") for p in files if p not in images]
    if not images:
        raise PredictError(f"no images ({exts}) in {path}" + (f"; {len(skipped)} other files" if skipped else ""))
    return images, skipped


def read_images(
    paths: list[Path], batch_size: int, skipped: list[tuple[Path, str]]
) -> Iterator[list[tuple[Path, Image.Image]]]:
    """Read images (as the datamodule does) in batches, appending unreadable ones to ``skipped`` (the rest go on)."""
    batch: list[tuple[Path, Image.Image]] = []
    for i, path in enumerate(paths):
        try:
            batch.append((path, runtime.load_image(path)))
        except (ValueError, OSError, Image.DecompressionBombError) as err:  # ImageReadError is a ValueError
            log.warning("skipping %s: %s", path, err)
            skipped.append((path, f"unreadable: {err}"))
        if batch and (len(batch) == batch_size or i == len(paths) - 1):
            yield batch
            batch = []


def load_batches(
    paths: list[Path], preprocess: Preprocess, batch_size: int, skipped: list[tuple[Path, str]]
) -> Iterator[tuple[list[Path], list[tuple[int, int]], Tensor]]:
    """Load and preprocess images in batches for a torch method (see :func:`read_images`).

    Yields:
        the batch's paths, their original (H, W) sizes, images (B, 3, S, S).
    """
    import torch

    for batch in read_images(paths, batch_size, skipped):
        images = torch.stack([preprocess(image, None)[0] for _, image in batch])
        yield [p for p, _ in batch], [(image.height, image.width) for _, image in batch], images


def load_references(
    cfg: DictConfig, preprocess: Preprocess, draw: ReferenceDraw | None = None
) -> tuple[Tensor, list[Path]]:
    """The k normal reference images of a few-shot method from ``cfg.references`` (first k, or a seeded draw).

    ``draw`` is the method's :meth:`~vlmad.methods.base.AnomalyMethod.reference_draw`: when it asks for views
    (AnomalyDINO's and SubspaceAD's rotated copies), they are made from the originals at their own resolution,
    as evaluation makes them, and each is preprocessed like a test image.
    """
    import torch

    k = int(cfg.method.get("k_shot", 0))
    if not cfg.get("references"):
        raise PredictError(f"method.k_shot={k} needs references=<folder of normal images of the object>")
    paths, _ = list_inputs(cfg.references)
    if cfg.get("reference_seed") is not None:
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(int(cfg.reference_seed)))
        paths = [paths[i] for i in order.tolist()]
    chosen: list[Path] = []
    images: list[Tensor] = []
    for batch_paths, _, batch in load_batches(paths, preprocess, 1, []):
        if len(chosen) == k:
            break
        chosen += batch_paths
        images.append(batch)
    if len(chosen) < k:
        raise PredictError(f"method.k_shot={k} but only {len(chosen)} readable images in {cfg.references}")
    if draw is not None and draw.views is not None:
        generator = torch.Generator().manual_seed(int(cfg.get("reference_seed") or 0))
        originals = [np.asarray(runtime.load_image(p)) for p in chosen]
        views = draw.views(originals, generator)
        return torch.stack([preprocess(Image.fromarray(v), None)[0] for v in views]), chosen
    return torch.cat(images), chosen


# ------------------------------------------------------------------ method
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def build_method(cfg: DictConfig) -> tuple[AnomalyMethod, Preprocess]:
    """Backbone -> method as ``vlmad.engine.run.build`` does, plus checkpoint weights and the matching preprocessing."""
    import random

    import torch
    from hydra.utils import instantiate

    from vlmad.data import Preprocess
    from vlmad.engine.checkpoint import load_method_weights

    # the seeds Lightning's seed_everything sets in run.build (a random backbone is the same), without Lightning
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    backbone = instantiate(cfg.backbone)
    method = instantiate(cfg.method, backbone=backbone)
    if method.transductive:
        hint = "method.image_fusion=fixed (a per-image k-shot score)" if "image_fusion" in cfg.method else "evaluate.py"
        raise PredictError(
            f"{type(method).__name__} with these settings is transductive: it scores a whole category's test images "
            f"together, never one image on its own. For per-image prediction use {hint}."
        )
    if cfg.get("ckpt_path"):
        load_method_weights(method, cfg.ckpt_path)
    elif method.trainable:
        log.warning(
            "predicting with %s without ckpt_path: its learned parts are at their initial values", type(method).__name__
        )
    method = method.to(resolve_device(cfg.get("device", "auto"))).eval()
    return method, Preprocess(**backbone.preprocess_config())  # the datamodule's source too (vlmad.engine.run.build)


# ------------------------------------------------------------------ thresholds
def _read_threshold(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PredictError(f"cannot read threshold file {path}: {err}") from err
    if not isinstance(data, dict) or any(not isinstance(data.get(k), (int, float)) for k in THRESHOLD_KEYS):
        raise PredictError(f"threshold file {path} needs numeric {list(THRESHOLD_KEYS)}")
    return data


def _save_beside_checkpoint(ckpt_path: str, data: dict[str, Any]) -> None:
    target = Path(ckpt_path + ".threshold.json")
    if target.exists():
        if json.loads(target.read_text()) != json.loads(json.dumps(data)):
            log.warning("%s exists with other thresholds: not overwritten (new ones only in the run dir)", target)
        return
    atomic_write_json(target, data)
    log.info("thresholds saved beside the checkpoint: %s", target)


def resolve_threshold(
    cfg: DictConfig,
    method: AnomalyMethod,
    preprocess: Preprocess,
    references: Iterable[Path] = (),
    save_beside: bool = True,
) -> dict[str, Any]:
    """Thresholds from ``threshold.value``, ``threshold.file``, calibration, or ``<ckpt>.threshold.json``.

    ``references`` (few-shot memory images) are left out of the calibration set: they score ~0 against
    themselves and would pull the thresholds down. ``save_beside``: a calibration with ``ckpt_path`` is also
    saved as ``<ckpt>.threshold.json`` for later runs (export passes False: it writes only its own folder).
    """
    tcfg = cfg.threshold
    sources = {"value": tcfg.value, "file": tcfg.file, "calibration.dir": tcfg.calibration.dir}
    given = [k for k, v in sources.items() if v is not None]
    if len(given) > 1:
        raise PredictError(f"give only one threshold source, got threshold.{' and threshold.'.join(given)}")
    meta = {
        "method": type(method).__name__,
        "backbone": method.backbone.model_name,
        "class_name": cfg.class_name,
        "k_shot": method.k_shot,
    }
    beside = Path(f"{cfg.ckpt_path}.threshold.json") if cfg.get("ckpt_path") else None
    if tcfg.value is not None:
        pixel = tcfg.value if tcfg.pixel_value is None else tcfg.pixel_value
        return {"image_threshold": float(tcfg.value), "pixel_threshold": float(pixel), **meta, "source": "value"}
    if tcfg.calibration.dir is not None:
        from vlmad.outputs.predictions import calibrate_threshold

        paths, skipped = list_inputs(tcfg.calibration.dir)
        exclude = {p.resolve() for p in references}
        paths = [p for p in paths if p.resolve() not in exclude]
        data = calibrate_threshold(
            method,
            (b for _, _, b in load_batches(paths, preprocess, cfg.batch_size, skipped)),
            float(tcfg.calibration.quantile),
            cfg.class_name,
        )
        data = {**data, **meta, "source": str(Path(tcfg.calibration.dir).resolve())}
        if beside is not None and save_beside:
            _save_beside_checkpoint(str(cfg.ckpt_path), data)
        return data
    path = tcfg.file if tcfg.file is not None else (beside if beside is not None and beside.exists() else None)
    if path is None:
        raise PredictError(NO_THRESHOLD)
    data = _read_threshold(path)
    mismatch = {k: (data[k], v) for k, v in meta.items() if k in data and data[k] != v}
    if mismatch:
        log.warning("threshold file %s was made for other settings (file vs now): %s", path, mismatch)
    return {**data, "source": data.get("source", str(path)), "file": str(path)}


# ------------------------------------------------------------------ prediction
def _stem(path: Path, used: set[str]) -> str:
    stem = path.stem if path.stem not in used else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
    while stem in used:  # a.png, a.PNG, ...
        stem += "_"
    used.add(stem)
    return stem


@dataclass
class Scorer:
    """What predict needs from a model, torch or exported.

    Attributes:
        score: preprocessed (B, 3, S, S) float32 -> scores (B,), maps (B, S, S) as numpy.
        to_input: a PIL image -> (3, S, S) float32, the model's preprocessing.
        image_size: S.
        threshold: the thresholds used (``image_threshold``, ``pixel_threshold``, ``source``, ...).
        title: what scored: method, backbone, backend.
        class_name: the object's name (an export's own, from its manifest).
    """

    score: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    to_input: Callable[[Image.Image], np.ndarray]
    image_size: int
    threshold: dict[str, Any]
    title: str
    class_name: str


def _write_outputs(
    out: Path, stem: str, anomaly_map: np.ndarray, size: tuple[int, int], pixel_threshold: float
) -> Path:
    """The predicted mask at the image's own size (the map resized back bilinearly, as evaluation's)."""
    path = out / "masks" / f"{stem}.png"
    save_png(path, (runtime.resize_map(anomaly_map, size) > pixel_threshold).astype(np.uint8) * 255)
    return path


def _torch_scorer(cfg: DictConfig, out: Path) -> Scorer:
    """The method built, prepared (few-shot references) and thresholded in torch."""
    import torch

    method, preprocess = build_method(cfg)
    device = next(method.parameters()).device
    references, ref_paths = None, []
    if method.k_shot > 0:
        references, ref_paths = load_references(cfg, preprocess, method.reference_draw(cfg.class_name))
        references = references.to(device)
        (out / "references.txt").write_text("".join(f"{p}\n" for p in ref_paths))
    method.prepare(cfg.class_name, references)
    threshold = resolve_threshold(cfg, method, preprocess, ref_paths)
    view = method.for_class(cfg.class_name).eval()  # the very module an export traces: one path for both

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores, maps = view(torch.from_numpy(images).to(device))
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()

    title = f"{type(method).__name__} k_shot={method.k_shot} | {method.backbone.model_name} | torch"
    size = method.backbone.image_size
    return Scorer(score, lambda image: preprocess(image, None)[0].numpy(), size, threshold, title, cfg.class_name)


def load_exported(cfg: DictConfig) -> Scorer:
    """``backend=onnx|openvino``: the export folder ``cfg.model`` scored by :mod:`vlmad.deploy` (no torch).

    Thresholds: ``threshold.value``, ``threshold.file`` or ``threshold.calibration.dir`` (scored by the export),
    else the ones stored at export. ``device``: ``auto``/``cpu`` run on the CPU; anything else (``GPU``,
    ``AUTO``, ...) is the runtime's device name (:class:`vlmad.deploy.DeployedModel`).
    """
    if cfg.backend not in runtime.BACKENDS or not cfg.get("model"):
        raise PredictError(
            f"backend={cfg.backend} needs backend=onnx|openvino and model=<folder written by vlmad export>"
        )
    device = str(cfg.get("device", "auto"))
    model = runtime.load(cfg.model, cfg.backend, device=None if device.lower() in ("auto", "cpu") else device)
    info = model.info
    title = f"{info['method']} k_shot={info['k_shot']} | {info['backbone']['model_name']} | {cfg.backend} export"
    threshold = _exported_threshold(cfg, model)
    return Scorer(model.run, model.preprocess, model.image_size, threshold, title, str(info["class_name"]))


def _exported_threshold(cfg: DictConfig, model: runtime.DeployedModel) -> dict[str, Any]:
    """:func:`resolve_threshold` for an export; its stored ones last."""
    t, info = cfg.threshold, model.info
    sources = {"value": t.value, "file": t.file, "calibration.dir": t.calibration.dir}
    given = [k for k, v in sources.items() if v is not None]
    if len(given) > 1:
        raise PredictError(f"give only one threshold source, got threshold.{' and threshold.'.join(given)}")
    meta = {
        "method": info["method"],
        "backbone": info["backbone"]["model_name"],
        "class_name": info["class_name"],
        "k_shot": info["k_shot"],
        "model": str(Path(cfg.model).resolve()),
    }
    if t.value is not None:
        pixel = t.value if t.pixel_value is None else t.pixel_value
        return {"image_threshold": float(t.value), "pixel_threshold": float(pixel), **meta, "source": "value"}
    if t.file is not None:
        return {**meta, **_read_threshold(t.file), "file": str(t.file)}
    if t.calibration.dir is not None:
        paths, skipped = list_inputs(t.calibration.dir)
        exclude = {Path(p).resolve() for p in info.get("references", [])}  # the memory scores ~0 against itself
        paths = [p for p in paths if p.resolve() not in exclude]
        batches = (
            np.stack([model.preprocess(image) for _, image in batch])
            for batch in read_images(paths, cfg.batch_size, skipped)
        )
        data = runtime.calibrate(model, batches, float(t.calibration.quantile))
        return {**data, **meta, "source": str(Path(t.calibration.dir).resolve())}
    if model.thresholds is None:
        raise PredictError(f"{cfg.model} was exported without thresholds; {NO_THRESHOLD}")
    return {
        "source": f"stored at export ({Path(cfg.model) / runtime.MANIFEST})",
        **model.thresholds,
        "file": str(Path(cfg.model) / runtime.MANIFEST),
    }


def _refuse_earlier_predictions(out: Path) -> None:
    if (out / "predictions.csv").exists():
        raise PredictError(
            f"{out} already holds the predictions of an earlier run (predictions.csv): nothing was overwritten; "
            "give another folder (hydra.run.dir=... or paths.output_dir=...)"
        )


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Score ``cfg.input`` and write predictions.csv, panels, masks, report.html, threshold.json, skipped.txt.

    Returns:
        one dict per scored image: the ``predictions.csv`` columns, plus ``score`` / ``threshold`` (the pair that
        decides: image score and image threshold, or with ``threshold.use=pixel`` the max pixel and the pixel
        threshold), ``is_anomalous``, ``overlay`` (the panel) and ``mask``.
    """
    if cfg.threshold.use not in ("score", "pixel"):
        raise PredictError(f"threshold.use must be score or pixel, got {cfg.threshold.use!r}")
    if cfg.get("input", "???") in ("???", None, ""):  # Hydra's MissingMandatoryValue would be a 15-line traceback
        raise PredictError("input= is required: an image file or a folder of images, e.g. vlmad predict input=images/")
    paths, skipped = list_inputs(cfg.input)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_earlier_predictions(out)
    scorer = load_exported(cfg) if cfg.get("backend", "torch") != "torch" else _torch_scorer(cfg, out)
    atomic_write_json(out / "threshold.json", scorer.threshold)  # readers never see a half-written file
    log.info("predict: %d images from %s with %s", len(paths), cfg.input, scorer.title)
    log.info(
        "thresholds: image %.4g, pixel %.4g (%s); decision by %s",
        scorer.threshold["image_threshold"],
        scorer.threshold["pixel_threshold"],
        scorer.threshold.get("source"),
        "the image score" if cfg.threshold.use == "score" else "the max pixel score",
    )
    maps_file = out / f".maps.{os.getpid()}.npy"  # this run's maps (float16) until the panels are drawn
    try:
        rows, scale = _score_all(cfg, out, paths, skipped, scorer, maps_file)
        _draw_panels(cfg, out, rows, scorer, scale, maps_file)
    finally:
        maps_file.unlink(missing_ok=True)
    _write_reports(out, rows, skipped, scorer, scale, cfg)
    return rows


def _score_all(
    cfg: DictConfig, out: Path, paths: list[Path], skipped: list[tuple[Path, str]], scorer: Scorer, maps_file: Path
) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    """Score every readable image; masks and predictions.csv rows are written as they are made (a crash keeps them).

    Returns:
        the rows and this run's colour scale (p1-p99 of a sample of its map values, as evaluation's per category).
    """
    s, t = scorer.image_size, scorer.threshold
    image_t, pixel_t = float(t["image_threshold"]), float(t["pixel_threshold"])
    use_score = cfg.threshold.use == "score"
    maps = np.lib.format.open_memmap(maps_file, mode="w+", dtype=np.float16, shape=(max(len(paths), 1), s, s))
    rows: list[dict[str, Any]] = []
    samples: list[np.ndarray] = []
    used: set[str] = set()
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as table:
        writer = csv.DictWriter(table, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for batch in read_images(paths, cfg.batch_size, skipped):
            scores, batch_maps = scorer.score(np.stack([scorer.to_input(image) for _, image in batch]))
            for i, (path, image) in enumerate(batch):
                amap = np.asarray(batch_maps[i], dtype=np.float32)
                image_score, peak = float(scores[i]), float(amap.max())
                score, threshold = (image_score, image_t) if use_score else (peak, pixel_t)
                stem = _stem(path, used)
                mask = _write_outputs(out, stem, amap, (image.height, image.width), pixel_t)
                maps[len(rows)] = amap
                samples.append(amap.ravel()[:: max(1, amap.size // MAP_SAMPLE)])
                row = {
                    "path": os.path.abspath(path),  # absolute, as evaluation's predictions.csv
                    "category": scorer.class_name,
                    "label": None,  # new images have no label (evaluation's column, empty here)
                    "defect_type": None,
                    "has_mask": None,
                    "image_score": image_score,
                    "max_pixel_score": peak,
                    "image_threshold": image_t,
                    "pixel_threshold": pixel_t,
                    "decision": decision(score, threshold),
                    "threshold_source": t.get("source"),
                    "score": score,
                    "threshold": threshold,
                    "is_anomalous": score > threshold,
                    "stem": stem,
                    "mask": str(mask),
                    "overlay": None,
                }
                rows.append(row)
                writer.writerow(
                    {k: "" if row[k] is None else row[k] for k in PREDICTION_COLUMNS} | {"path": safe_name(row["path"])}
                )
            table.flush()  # rows are on disk as they are made: a crash keeps every scored image
            log.info("scored %d / %d images", len(rows), len(paths))
    maps.flush()
    scale = colour_scale(np.concatenate(samples), *SCALE_PERCENTILES) if samples else (0.0, 1.0)
    return rows, scale


def _draw_panels(
    cfg: DictConfig, out: Path, rows: list[dict[str, Any]], scorer: Scorer, scale: tuple[float, float], maps_file: Path
) -> None:
    """Evaluation's labelled panel for every scored image, at the image's own aspect ratio, on the run's scale."""
    if not rows:
        return
    maps = np.load(maps_file, mmap_mode="r")
    note = f"{scale[0]:.3g}..{scale[1]:.3g} = p{SCALE_PERCENTILES[0]:g}-p{SCALE_PERCENTILES[1]:g} of this run's maps"
    folder = out / "heatmaps" / str(scorer.class_name)
    by = "image score" if cfg.threshold.use == "score" else "max pixel"
    for k, row in enumerate(rows):
        try:
            image = runtime.load_image(row["path"])
        except (ValueError, OSError) as err:  # changed since it was scored: no panel, said once
            log.warning("no panel for %s: %s", row["path"], err)
            continue
        size = display_size((image.height, image.width))
        header = [
            f"{scorer.class_name}  ({safe_name(Path(row['path']).name)}): new image, no label",
            f"image score {row['image_score']:.4f}  max pixel {row['max_pixel_score']:.4f}  "
            f"{row['decision']} at {by} threshold {row['threshold']:.4g}",
            f"threshold: {row['threshold_source']}",
        ]
        panel = render_panel(
            resize_array(np.asarray(image), size, "image"),
            resize_array(np.asarray(maps[k], dtype=np.float32), size, "map"),
            None,
            scale,
            header,
            note,
            row["pixel_threshold"],
        )
        path = folder / f"{row['stem']}.png"
        save_png(path, panel)
        row["overlay"] = str(path)


def safe_name(path: str | Path) -> str:
    """``path`` as valid UTF-8 text: bytes of a file name that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _write_reports(
    out: Path,
    rows: list[dict[str, Any]],
    skipped: list[tuple[Path, str]],
    scorer: Scorer,
    scale: tuple[float, float],
    cfg: DictConfig,
) -> None:
    if skipped:
        with (out / "skipped.txt").open("w", newline="", encoding="utf-8") as f:
            f.write("".join(f"{safe_name(p)}\t{safe_name(reason)}\n" for p, reason in skipped))
    n_anomalous = sum(r["is_anomalous"] for r in rows)
    summary = (
        f"{len(rows)} images scored, {n_anomalous} anomalous, {len(skipped)} skipped"
        + (f" (see {out / 'skipped.txt'})" if skipped else "")
        + f"; outputs in {out}"
    )
    if rows:
        notes = [
            f"input: {safe_name(Path(str(cfg.input)).resolve())}; {len(skipped)} files skipped"
            + (" (skipped.txt)" if skipped else ""),
            f"panels: heatmaps/{scorer.class_name}/; masks at each image's own size: masks/; colour scale "
            f"{scale[0]:.3g}..{scale[1]:.3g} (p{SCALE_PERCENTILES[0]:g}-p{SCALE_PERCENTILES[1]:g} of this run's maps)",
        ]
        report_rows = [{**r, "path": safe_name(r["path"])} for r in rows]
        write_predict_report(out, scorer.title, report_rows, scorer.threshold, notes)
    print(summary, flush=True)
    to_log_file(summary)  # the console has it; the run's predict.log too
    if not rows:
        raise PredictError(f"none of the inputs could be read; see {out / 'skipped.txt'}")


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Entry point of ``vlmad predict``."""
    quiet()  # also under `python -m vlmad.deploy.predict`: no open_clip INFO lines, short warnings
    predict(cfg)


if __name__ == "__main__":
    main()
