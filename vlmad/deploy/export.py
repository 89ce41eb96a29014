"""Export a prepared method to ONNX / OpenVINO: ``vlmad export method=... class_name=... format=onnx``.

The exported graph takes a batch of CLIP-normalised images (dynamic batch axis) and returns the image scores
(B,) and the anomaly maps (B, S, S) of the method's own ``score`` for one class, traced through
``method.for_class(class_name)``. Everything that does not depend on the image (``class_constants``: text
prototypes, AnomalyCLIP's two prompt embeddings after the text encoder, few-shot memories) is computed once
here and stored as constants: the text encoder is not in the graph. ``vlmad_model.json`` beside the model
holds what :mod:`vlmad.deploy` needs (preprocessing, thresholds, input/output names) and what a reader wants
to know (method settings, weights, references). Transductive methods (scoring a category's images together)
are refused: they are not a per-image function.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import vlmad
from vlmad.config import CONF_DIR as CONF
from vlmad.errors import VlmadError, exit_on_user_error
from vlmad.methods.base import AnomalyMethod, ClassView

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "both")
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_score", "anomaly_map")
MANIFEST = "vlmad_model.json"
ONNX_FILE, OPENVINO_FILE = "model.onnx", "model.xml"
OPSET = 18


class ExportError(VlmadError, ValueError):
    """A method or setting that cannot be exported."""


def export_graph(method: AnomalyMethod, class_name: str) -> ClassView:
    """The per-image graph of a method already ``prepare``-d for ``class_name``: ``method.for_class`` in eval mode.

    The graph runs the method's own :meth:`~vlmad.methods.base.AnomalyMethod.score` with the class's constants as
    buffers: there is no export-specific copy of any method.

    Raises:
        ExportError: transductive methods and methods without a per-class ``score``.
    """
    if getattr(method, "transductive", False):
        hint = " or method.image_fusion=fixed (a per-image k-shot score)" if hasattr(method, "image_fusion") else ""
        raise ExportError(
            f"{type(method).__name__} is transductive here (it scores a category's images together), so it has no "
            f"per-image graph to export: score it with vlmad predict (torch backend){hint}."
        )
    if type(method).score is AnomalyMethod.score:
        raise ExportError(
            f"{type(method).__name__} has no per-class score(images, constants) (vlmad.methods.base.AnomalyMethod), "
            "so it has no graph to export"
        )
    return method.eval().for_class(class_name).eval()


def _device(graph: nn.Module) -> torch.device:
    """Where the graph's tensors live (CPU for a graph without any)."""
    tensor = next(iter([*graph.parameters(), *graph.buffers()]), None)
    return torch.device("cpu") if tensor is None else tensor.device


# ------------------------------------------------------------------ files
def export_onnx(graph: nn.Module, path: Path, image_size: int) -> None:
    """Write the graph as ONNX with a dynamic batch axis (input ``images`` (B, 3, S, S)).

    PyTorch's TorchScript-based exporter is used: the dynamo exporter gives the same graph but took ~40x longer
    (minutes for the tiny backbone) on our machines. The example batch is 2: a batch of 1 can be specialised.
    """
    example = torch.zeros(2, 3, image_size, image_size, device=_device(graph))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX translation
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation of the TorchScript exporter; tracer notes on constants
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_openvino(onnx_path: Path, xml_path: Path) -> None:
    """Convert the ONNX file to OpenVINO IR (``.xml`` + ``.bin``), weights kept in float32."""
    import openvino as ov

    # save_model compresses weights to float16 by default, which breaks parity with torch.
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def check_export(graph: nn.Module, folder: Path, backends: list[str], image_size: int) -> dict[str, Any]:
    """Max |exported - torch| of scores and maps on a seeded random batch of 2, per backend."""
    from vlmad import deploy

    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores, maps = (t.float().cpu().numpy() for t in graph(images.to(_device(graph))))
    out = {}
    for backend in backends:
        got_scores, got_maps = deploy.load(folder, backend).run(images.numpy())
        out[backend] = {
            "pred_score": float(np.abs(got_scores - scores).max()),
            "anomaly_map": float(np.abs(got_maps - maps).max()),
        }
    return out


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(
    cfg: DictConfig, method: AnomalyMethod, references: list[Path], threshold: dict[str, Any] | None
) -> dict[str, Any]:
    """Everything a runtime needs and a reader wants to know about an export (``vlmad_model.json``).

    The runtime's part (preprocessing, thresholds, input/output names) is :func:`vlmad.deploy.basic_manifest`;
    :func:`vlmad.deploy.write_manifest` adds the model files' sha256 and the manifest checksum.
    """
    from vlmad.deploy.runtime import basic_manifest

    backbone, size = method.backbone, method.backbone.image_size
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    runtime = basic_manifest(size, backbone.mean, backbone.std)
    return {
        "format_version": runtime.pop("format_version"),
        "vlmad_version": vlmad.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": type(method).__name__,
        "method_config": method_cfg,
        "backbone": {
            "model_name": backbone.model_name,
            "pretrained": backbone.pretrained,
            "image_size": size,
            "patch_size": backbone.patch_size,
            "depth": backbone.depth,
        },
        "weights": {
            "backbone": backbone.pretrained or "random (backbone.pretrained=null)",
            "checkpoint": str(Path(cfg.ckpt_path).resolve()) if cfg.get("ckpt_path") else None,
            "checkpoint_sha256": _sha256(cfg.ckpt_path) if cfg.get("ckpt_path") else None,
        },
        "class_name": cfg.class_name,
        "k_shot": method.k_shot,
        "references": [str(p.resolve()) for p in references],
        **runtime,
        "thresholds": threshold,
        "threshold_use": cfg.threshold.use,
        "torch_version": torch.__version__,
        "onnx_opset": OPSET,
    }


# ------------------------------------------------------------------ command
def _threshold(cfg: DictConfig, method: AnomalyMethod, preprocess: Any, references: list[Path]) -> dict | None:
    """Thresholds as ``vlmad.deploy.predict`` resolves them; None (with a warning) when no source is given."""
    from vlmad.deploy.predict import resolve_threshold

    t = cfg.threshold
    beside = cfg.get("ckpt_path") and Path(f"{cfg.ckpt_path}.threshold.json").exists()
    if t.value is None and t.file is None and t.calibration.dir is None and not beside:
        log.warning(
            "no threshold given: the export scores images but makes no OK/NG decisions until a threshold "
            "is passed (threshold.value=... or threshold.calibration.dir=<normal images>)"
        )
        return None
    return resolve_threshold(cfg, method, preprocess, references, save_beside=False)  # only the export folder


def _export_target(cfg: DictConfig) -> Path:
    """The export folder: new, empty, or an earlier export (replaced whole); anything else is refused up front."""
    from vlmad.deploy.runtime import MANIFEST as MANIFEST_NAME

    target = (Path(cfg.output_dir) if cfg.output_dir else Path(cfg.paths.output_dir) / "model").absolute()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST_NAME).exists())):
        raise ExportError(
            f"output_dir {target} exists and is not an export folder (no {MANIFEST_NAME}): choose a new or empty "
            "folder, or an earlier export to replace"
        )
    return target


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A hidden folder beside ``target`` that replaces it whole when the block succeeds.

    On any error the staging folder (and any parent folder made for it) is removed: a failed export never mixes
    with an earlier one in ``target`` and leaves no empty folder. The earlier export is moved aside, the new one
    renamed into place, then the earlier one deleted.
    """
    made = next((p for p in [target.parent, *target.parent.parents][::-1] if not p.exists()), None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.with_name(f".{target.name}.export-{tag}")
    staging.mkdir()
    try:
        yield staging
        old = target.with_name(f".{target.name}.old-{tag}")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        folder = target.parent
        while made is not None and folder.is_relative_to(made):  # the parents made here, up to the first one
            with suppress(OSError):
                folder.rmdir()
            folder = folder.parent
        raise


def export(cfg: DictConfig) -> Path:
    """Build and prepare the method as ``vlmad.deploy.predict`` does, then write the export folder.

    Returns:
        the folder holding ``vlmad_model.json`` and the model file(s).
    """
    from vlmad.deploy.predict import build_method, load_references
    from vlmad.deploy.runtime import write_manifest

    if cfg.format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {cfg.format!r}")
    if cfg.get("precision", "fp32") != "fp32":
        from vlmad.deploy.quantize import check_settings

        check_settings(cfg)  # before anything is built: int8 needs the OpenVINO format and normal images
    target = _export_target(cfg)
    method, preprocess = build_method(cfg)
    if getattr(method, "transductive", False):
        export_graph(method, cfg.class_name)  # raises the explanation before any reference is read
    references, ref_paths = None, []
    if method.k_shot > 0:
        references, ref_paths = load_references(cfg, preprocess, method.reference_draw(cfg.class_name))
    method.prepare(cfg.class_name, None if references is None else references.to(method.backbone.device))
    threshold = _threshold(cfg, method, preprocess, ref_paths)
    graph = export_graph(method, cfg.class_name)
    info = manifest(cfg, method, ref_paths, threshold)
    size = method.backbone.image_size
    with _staging(target) as folder:
        onnx_path = folder / ONNX_FILE
        export_onnx(graph, onnx_path, size)
        if cfg.format != "openvino":
            info["files"]["onnx"] = ONNX_FILE
        if cfg.format != "onnx":
            export_openvino(onnx_path, folder / OPENVINO_FILE)
            info["files"]["openvino"] = OPENVINO_FILE
        if cfg.format == "openvino":
            onnx_path.unlink()  # only the intermediate of the conversion
        write_manifest(folder, info)
        info["export_check"] = check_export(graph.cpu(), folder, list(info["files"]), size)
        write_manifest(folder, info)
        if cfg.get("precision", "fp32") == "int8":  # NNCF INT8 of the OpenVINO model, behind an accuracy gate
            from vlmad.deploy.quantize import apply_int8

            apply_int8(cfg, folder, info)
            write_manifest(folder, info)
    log.info("exported %s (%s) to %s", info["method"], ", ".join(info["files"].values()), target)
    print(
        f"exported {info['method']} ({', '.join(info['files'].values())}) to {target}; max |exported - torch| on a "
        f"random batch: {info['export_check']}",
        flush=True,
    )
    return target


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Entry point of ``vlmad export``."""
    from vlmad.logs import quiet

    quiet()  # also under `python -m vlmad.deploy.export`: no open_clip INFO lines, short warnings
    export(cfg)


if __name__ == "__main__":
    main()
