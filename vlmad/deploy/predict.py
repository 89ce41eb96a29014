"""Predict on new images: ``vlmad predict method=winclip input=img_or_folder class_name=bottle ...``.

Writes into the run directory, per image, ``<stem>_overlay.png`` (image | heatmap | predicted mask) and
``<stem>_mask.png`` (0/255 at the pixel threshold), plus ``predictions.csv``, ``threshold.json`` and
``skipped.txt`` (unreadable or unsupported files, with the reason). Thresholds come from normal images only:
given (``threshold.value``), loaded (``threshold.file`` or ``<ckpt_path>.threshold.json``) or calibrated as
a quantile of the scores of a folder of normal images (``threshold.calibration.dir``). ``backend=onnx|openvino
model=DIR`` scores with a folder written by ``vlmad export`` (:mod:`vlmad.deploy`) instead of torch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from vlmad.config import CONF_DIR as CONF
from vlmad.data import Preprocess, load_image
from vlmad.engine.checkpoint import load_method_weights
from vlmad.errors import exit_on_user_error
from vlmad.io import atomic_write_json
from vlmad.methods.base import AnomalyMethod
from vlmad.outputs.heatmaps import denormalize_image, overlay_panel, save_png
from vlmad.outputs.predictions import ThresholdError, calibrate_threshold

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


def load_batches(
    paths: list[Path], preprocess: Preprocess, batch_size: int, skipped: list[tuple[Path, str]]
) -> Iterator[tuple[list[Path], list[tuple[int, int]], Tensor]]:
    """Load and preprocess images in batches, appending unreadable ones to ``skipped`` (the rest go on).

    Yields:
        the batch's paths, their original (H, W) sizes, images (B, 3, S, S).
    """
    batch: list[tuple[Path, tuple[int, int], Tensor]] = []
    for i, path in enumerate(paths):
        try:
            image = load_image(path)
        except (ValueError, Image.DecompressionBombError) as err:  # DataError is a ValueError
            log.warning("skipping %s: %s", path, err)
            skipped.append((path, f"unreadable: {err}"))
        else:
            batch.append((path, (image.height, image.width), preprocess(image, None)[0]))
        if batch and (len(batch) == batch_size or i == len(paths) - 1):
            yield [b[0] for b in batch], [b[1] for b in batch], torch.stack([b[2] for b in batch])
            batch = []


def load_references(cfg: DictConfig, preprocess: Preprocess) -> tuple[Tensor, list[Path]]:
    """The k normal reference images of a few-shot method from ``cfg.references`` (first k, or a seeded draw)."""
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
    return torch.cat(images), chosen


# ------------------------------------------------------------------ method
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def build_method(cfg: DictConfig) -> tuple[AnomalyMethod, Preprocess]:
    """Backbone -> method as ``vlmad.engine.run.build`` does, plus checkpoint weights and the matching preprocessing."""
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


def _device(method: AnomalyMethod) -> torch.device:
    return next(method.parameters()).device


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


def _write_outputs(
    out: Path,
    stem: str,
    image: Tensor,
    anomaly_map: Tensor,
    size: tuple[int, int],
    pixel_threshold: float,
    preprocess: Preprocess,
) -> tuple[Path, Path]:
    """Overlay at the model's resolution; mask at the image's own size (the map resized back bilinearly)."""
    pixels = denormalize_image(image, preprocess.mean.flatten().tolist(), preprocess.std.flatten().tolist())
    panel = overlay_panel(pixels, anomaly_map.numpy(), (anomaly_map > pixel_threshold).numpy())
    full = F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    overlay_path, mask_path = out / f"{stem}_overlay.png", out / f"{stem}_mask.png"
    save_png(overlay_path, panel)
    save_png(mask_path, (full > pixel_threshold).numpy().astype(np.uint8) * 255)
    return overlay_path, mask_path


def _torch_scorer(method: AnomalyMethod, class_name: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def score_batch(images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            pred = method(images.to(_device(method)), [class_name] * len(images))
        return pred.pred_score.float().cpu(), pred.anomaly_map.float().cpu()

    return score_batch


def load_exported(cfg: DictConfig) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], Preprocess, dict[str, Any]]:
    """``backend=onnx|openvino``: the export folder ``cfg.model`` scored by :mod:`vlmad.deploy` (no torch model).

    Thresholds: ``threshold.value``, ``threshold.file`` or ``threshold.calibration.dir`` (scored by the export),
    else the ones stored at export.

    Returns:
        images (B, 3, S, S) -> (scores (B,), maps (B, S, S)); the export's preprocessing; the thresholds.
    """
    from vlmad import deploy

    if cfg.backend not in deploy.BACKENDS or not cfg.get("model"):
        raise PredictError(
            f"backend={cfg.backend} needs backend=onnx|openvino and model=<folder written by vlmad export>"
        )
    model = deploy.load(cfg.model, cfg.backend)
    preprocess = Preprocess(model.image_size, tuple(model.mean), tuple(model.std))

    def score_batch(images: Tensor) -> tuple[Tensor, Tensor]:
        scores, maps = model.run(images.numpy())
        return torch.from_numpy(scores), torch.from_numpy(maps)

    return score_batch, preprocess, _exported_threshold(cfg, model, preprocess)


def _exported_threshold(cfg: DictConfig, model: Any, preprocess: Preprocess) -> dict[str, Any]:
    """:func:`resolve_threshold` for an export (a ``vlmad.deploy.DeployedModel``); its stored ones last."""
    from vlmad import deploy

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
        batches = (b.numpy() for _, _, b in load_batches(paths, preprocess, cfg.batch_size, skipped))
        data = deploy.calibrate(model, batches, float(t.calibration.quantile))
        return {**data, **meta, "source": str(Path(t.calibration.dir).resolve())}
    if model.thresholds is None:
        raise PredictError(f"{cfg.model} was exported without thresholds; {NO_THRESHOLD}")
    return {**model.thresholds, "file": str(Path(cfg.model) / deploy.MANIFEST)}


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Score ``cfg.input`` and write overlays, masks, predictions.csv, threshold.json, skipped.txt.

    Returns:
        one dict per scored image: path, score, is_anomalous, threshold, overlay, mask.
    """
    if cfg.threshold.use not in ("score", "pixel"):
        raise PredictError(f"threshold.use must be score or pixel, got {cfg.threshold.use!r}")
    paths, skipped = list_inputs(cfg.input)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("backend", "torch") != "torch":
        score_batch, preprocess, threshold = load_exported(cfg)
    else:
        method, preprocess = build_method(cfg)
        references, ref_paths = None, []
        if method.k_shot > 0:
            references, ref_paths = load_references(cfg, preprocess)
            references = references.to(_device(method))
            (out / "references.txt").write_text("".join(f"{p}\n" for p in ref_paths))
        method.prepare(cfg.class_name, references)
        threshold = resolve_threshold(cfg, method, preprocess, ref_paths)
        score_batch = _torch_scorer(method, cfg.class_name)
    atomic_write_json(out / "threshold.json", threshold)  # readers never see a half-written file
    image_t, pixel_t = float(threshold["image_threshold"]), float(threshold["pixel_threshold"])
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    with _text_out(out / "predictions.csv") as table:
        writer = csv.writer(table)
        writer.writerow(["path", "score", "is_anomalous", "threshold"])
        for batch_paths, sizes, images in load_batches(paths, preprocess, cfg.batch_size, skipped):
            scores, maps = score_batch(images)
            for i, path in enumerate(batch_paths):
                use_score = cfg.threshold.use == "score"
                score, t = (float(scores[i]), image_t) if use_score else (float(maps[i].max()), pixel_t)
                overlay, mask = _write_outputs(
                    out, _stem(path, used), images[i], maps[i], sizes[i], pixel_t, preprocess
                )
                rows.append(
                    {
                        "path": str(path),
                        "score": score,
                        "is_anomalous": score > t,
                        "threshold": t,
                        "overlay": str(overlay),
                        "mask": str(mask),
                    }
                )
                writer.writerow([safe_name(path), score, int(score > t), t])
            table.flush()  # rows are on disk as they are made: a crash keeps every scored image
    _write_reports(out, rows, skipped)
    return rows


def safe_name(path: str | Path) -> str:
    """``path`` as valid UTF-8 text: bytes of a file name that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _text_out(path: Path) -> Any:
    return path.open("w", newline="", encoding="utf-8")


def _write_reports(out: Path, rows: list[dict[str, Any]], skipped: list[tuple[Path, str]]) -> None:
    if skipped:
        with _text_out(out / "skipped.txt") as f:
            f.write("".join(f"{safe_name(p)}\t{safe_name(reason)}\n" for p, reason in skipped))
    n_anomalous = sum(r["is_anomalous"] for r in rows)
    print(
        f"{len(rows)} images scored, {n_anomalous} anomalous, {len(skipped)} skipped"
        + (f" (see {out / 'skipped.txt'})" if skipped else "")
        + f"; outputs in {out}",
        flush=True,
    )
    if not rows:
        raise PredictError(f"none of the inputs could be read; see {out / 'skipped.txt'}")


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Entry point of ``vlmad predict``."""
    predict(cfg)


if __name__ == "__main__":
    main()
