"""INT8 export: NNCF post-training quantisation of the OpenVINO model, with an accuracy gate.

``vlmad export ... format=openvino precision=int8`` runs this after the fp32 export is written and checked:

1. calibration: normal images (``int8.calibration_dir``, else ``threshold.calibration.dir``, else
   ``references``), every ``int8.holdout_every``-th one held out for the agreement measurement;
2. ``nncf.quantize`` with ``ModelType.TRANSFORMER`` (its mixed preset: symmetric weights, asymmetric activations)
   and an ignored scope: the **map head** stays fp32, i.e. every node between the ``anomaly_map`` output and the
   last layer norm (OpenVINO ``MVN``) of each feature path: the projections, the cosine similarity to the text
   prototypes / few-shot memory, the softmax, the bilinear upsampling and the Gaussian blur. The transformer
   blocks (attention and MLP MatMuls) are INT8;
3. agreement with the fp32 model on the held-out images (and on ``int8.validation_dir`` when given): Spearman
   rank correlation of each map, max |Δ pixel score|, max |Δ image score|, and with labelled images (an MVTec
   layout category: ``test/<type>/*.png``, ``ground_truth/<type>/<stem>_mask.png``) Δ image AUROC, Δ pixel AUROC,
   Δ AUPRO (fp32 − int8: positive is a drop);
4. the gate: with labels, the pixel AUROC drop; without, ``1 - min map rank correlation`` (a label-free stand-in,
   named as such in the manifest). Above ``int8.max_drop`` the export is refused (nothing written) unless
   ``int8.force=true``. The agreement goes into ``vlmad_model.json`` (``precision``, ``int8``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from vlmad.deploy.runtime import load_image, preprocess
from vlmad.errors import VlmadError

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.xml"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class QuantizationError(VlmadError, ValueError):
    """INT8 export refused: bad settings, no calibration images, or accuracy below the gate."""


def _images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantizationError(f"calibration folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def check_settings(cfg: DictConfig) -> None:
    """Refuse an INT8 export that cannot work, before the method is built."""
    precision = cfg.get("precision", "fp32")
    if precision not in ("fp32", "int8"):
        raise QuantizationError(f"precision must be fp32 or int8, got {precision!r}")
    if precision == "int8" and cfg.format == "onnx":
        raise QuantizationError("precision=int8 quantises the OpenVINO model: use format=openvino or format=both")
    if precision == "int8":
        calibration_split(cfg)


def calibration_split(cfg: DictConfig) -> tuple[list[Path], list[Path]]:
    """Normal images for calibration and the held-out ones for the agreement (every ``holdout_every``-th)."""
    q = cfg.int8
    source = q.calibration_dir or cfg.threshold.calibration.dir or cfg.get("references")
    if not source:
        raise QuantizationError(
            "precision=int8 needs normal images to calibrate on: int8.calibration_dir=<e.g. bottle/train/good> "
            "(or threshold.calibration.dir / references)"
        )
    paths = _images(source)
    every = int(q.holdout_every)
    held = [p for i, p in enumerate(paths) if every > 0 and i % every == every - 1]
    calib = [p for p in paths if p not in held]
    if not calib or not held:
        raise QuantizationError(
            f"{source}: {len(paths)} images; int8 needs at least one to calibrate on and one held out "
            f"(int8.holdout_every={every})"
        )
    return calib, held


def labelled(root: str | Path) -> tuple[list[Path], np.ndarray, list[Path | None]]:
    """An MVTec-layout category's test images, labels (0 good) and masks (None for good images)."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise QuantizationError(f"int8.validation_dir={root} needs test/<type>/ images (MVTec layout)")
    paths, labels, masks = [], [], []
    for kind in sorted(d for d in test.iterdir() if d.is_dir()):
        for p in _images(kind):
            paths.append(p)
            labels.append(int(kind.name != "good"))
            mask = root / "ground_truth" / kind.name / f"{p.stem}_mask.png"
            masks.append(mask if kind.name != "good" else None)
            if kind.name != "good" and not mask.is_file():
                raise QuantizationError(f"{p}: no mask {mask}")
    if len(set(labels)) < 2:
        raise QuantizationError(f"int8.validation_dir={root} needs good and defective test images")
    return paths, np.asarray(labels), masks


def head_nodes(model: Any) -> list[str]:
    """Friendly names of the map head: nodes from ``anomaly_map`` back to the last layer norm of each path.

    The walk stops at ``MVN`` (layer norm) and does not follow ``ShapeOf`` (shape arithmetic only).
    """
    result = next(o for o in model.outputs if "anomaly_map" in o.get_names()).get_node()
    stack, seen, names = [result], set(), []
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        kind = node.get_type_name()
        if kind in ("MVN", "ShapeOf", "Parameter"):
            continue
        names.append(name)
        stack += [inp.get_source_output().get_node() for inp in node.inputs()]
    return names


def _batches(paths: list[Path], size: int, mean: list[float], std: list[float]) -> list[np.ndarray]:
    return [preprocess(load_image(p), size, mean, std)[None] for p in paths]


def _run(compiled: Any, batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    outs = [compiled(b) for b in batches]
    scores = np.concatenate([o[compiled.output("pred_score")] for o in outs])
    maps = np.concatenate([o[compiled.output("anomaly_map")] for o in outs])
    return scores, maps


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def _label_metrics(scores: np.ndarray, maps: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    import torch

    from vlmad.metrics.anomaly_metrics import binary_curve_metrics
    from vlmad.metrics.aupro import pixel_metrics

    image_auroc = binary_curve_metrics(torch.from_numpy(scores.astype(np.float64)), torch.from_numpy(labels))[0]
    pixel = pixel_metrics(maps, masks)
    return {"image_auroc": image_auroc, "pixel_auroc": pixel["pixel_auroc"], "aupro": pixel["pixel_aupro"]}


def agreement(fp32: Any, int8: Any, batches: list[np.ndarray]) -> dict[str, float]:
    """Map rank correlation (mean, min), max |Δ pixel score|, max |Δ image score| on ``batches``."""
    s32, m32 = _run(fp32, batches)
    s8, m8 = _run(int8, batches)
    rho = [_spearman(a, b) for a, b in zip(m32, m8, strict=True)]
    return {
        "n_images": len(batches),
        "map_rank_correlation_mean": float(np.mean(rho)),
        "map_rank_correlation_min": float(np.min(rho)),
        "max_abs_delta_pixel_score": float(np.abs(m32 - m8).max()),
        "max_abs_delta_image_score": float(np.abs(s32 - s8).max()),
    }


def apply_int8(cfg: DictConfig, folder: Path, info: dict[str, Any]) -> None:
    """Quantise the export in ``folder`` (fp32 IR already written and checked) and update ``info`` in place.

    The OpenVINO entry then points at ``model_int8.xml`` (the fp32 IR is removed); an ONNX file stays fp32.
    """
    fp32_xml = info["files"]["openvino"]
    entry = quantize_export(cfg, folder, info, fp32_xml)
    for name in (fp32_xml, str(Path(fp32_xml).with_suffix(".bin"))):
        (folder / name).unlink()
    info["files"]["openvino"] = INT8_FILE
    info["precision"] = {backend: "int8" if backend == "openvino" else "fp32" for backend in info["files"]}
    entry["note"] = "export_check compares the fp32 models with torch; the INT8 agreement is measured here"
    info["int8"] = entry


def quantize_export(cfg: DictConfig, folder: Path, info: dict[str, Any], fp32_xml: str) -> dict[str, Any]:
    """Quantise ``folder/fp32_xml`` to ``folder/model_int8.xml`` and return the manifest's ``int8`` entry.

    Raises:
        QuantizationError: no calibration images, or the drop passes ``int8.max_drop`` (without ``int8.force``).
    """
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)

    q = cfg.int8
    size = int(info["preprocess"]["image_size"])
    mean, std = info["preprocess"]["mean"], info["preprocess"]["std"]
    calib, held = calibration_split(cfg)
    core = ov.Core()
    model = core.read_model(str(folder / fp32_xml))
    ignored = head_nodes(model)
    n_matmul = sum(op.get_type_name() == "MatMul" for op in model.get_ops())
    n_head_matmul = sum(op.get_type_name() == "MatMul" for op in model.get_ops() if op.get_friendly_name() in ignored)
    calib_batches = _batches(calib, size, mean, std)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(calib_batches),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=min(int(q.subset_size), len(calib_batches)),
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        fast_bias_correction=True,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            disable_bias_correction=not q.bias_correction,
            # SmoothQuant (on by default for transformers); matmul alpha -1 turns it off
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters()
            if q.get("smooth_quant", True)
            else nncf.AdvancedSmoothQuantParameters(matmul=-1),
        ),
    )
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    fp32_c = core.compile_model(model, "CPU", config)
    int8_c = core.compile_model(quantized, "CPU", config)
    entry: dict[str, Any] = {
        "tool": f"nncf {nncf.__version__}, openvino {ov.__version__}",
        "model_type": "transformer",
        "preset": "mixed (NNCF default for transformers)",
        "bias_correction": bool(q.bias_correction),
        "smooth_quant": bool(q.get("smooth_quant", True)),
        "calibration": {"images": len(calib), "source": str(calib[0].parent.resolve())},
        "ignored_scope": {
            "rule": "map head: nodes between anomaly_map and the last layer norm (MVN) of each path",
            "nodes": len(ignored),
            "matmuls_fp32": n_head_matmul,
            "matmuls_total": n_matmul,
        },
        "held_out": agreement(fp32_c, int8_c, _batches(held, size, mean, std)),
    }
    if q.validation_dir:
        paths, labels, mask_paths = labelled(q.validation_dir)
        batches = _batches(paths, size, mean, std)
        masks = np.stack(
            [
                np.zeros((size, size), np.uint8)
                if m is None
                else (np.asarray(load_image(m).convert("L").resize((size, size), 0)) > 127).astype(np.uint8)
                for m in mask_paths
            ]
        )
        s32, m32 = _run(fp32_c, batches)
        s8, m8 = _run(int8_c, batches)
        f, i = _label_metrics(s32, m32, labels, masks), _label_metrics(s8, m8, labels, masks)
        entry["validation"] = {
            "source": str(Path(q.validation_dir).resolve()),
            "n_images": len(paths),
            "fp32": f,
            "int8": i,
            "drop": {k: f[k] - i[k] for k in f},
            **agreement(fp32_c, int8_c, batches),
        }
        gate_metric, drop = "pixel_auroc drop on int8.validation_dir", entry["validation"]["drop"]["pixel_auroc"]
    else:
        gate_metric = "1 - min map rank correlation on held-out normal images (no labels: a stand-in)"
        drop = 1.0 - entry["held_out"]["map_rank_correlation_min"]
    passed = not math.isnan(drop) and drop <= float(q.max_drop)
    entry["gate"] = {"metric": gate_metric, "drop": drop, "max_drop": float(q.max_drop), "passed": passed}
    if not passed and not q.force:
        raise QuantizationError(
            f"INT8 refused: {gate_metric} = {drop:.4g} > int8.max_drop={q.max_drop} (agreement: {entry}); "
            "nothing written. Pass int8.force=true to write it anyway, or keep precision=fp32"
        )
    entry["gate"]["forced"] = bool(not passed and q.force)
    ov.save_model(quantized, str(folder / INT8_FILE), compress_to_fp16=False)
    log.info("INT8 agreement: %s", entry)
    return entry
