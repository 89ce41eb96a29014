"""Export a prepared method to ONNX / OpenVINO: ``vlmad export method=... class_name=... format=onnx``.

The exported graph takes a batch of CLIP-normalised images (dynamic batch axis) and returns the image scores
(B,) and the anomaly maps (B, S, S) of ``method.forward``. Everything that does not depend on the image (text
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
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import vlmad
from vlmad.config import CONF_DIR as CONF
from vlmad.errors import VlmadError, exit_on_user_error
from vlmad.methods.anomalyclip import AnomalyCLIP
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.base import AnomalyMethod
from vlmad.methods.ops import gaussian_blur, scaled_sigma
from vlmad.methods.winclip import WinCLIP

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "both")
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_score", "anomaly_map")
MANIFEST = "vlmad_model.json"
ONNX_FILE, OPENVINO_FILE = "model.onnx", "model.xml"
OPSET = 18


class ExportError(VlmadError, ValueError):
    """A method or setting that cannot be exported."""


def _nearest_memory(queries: Tensor, memory: Tensor) -> Tensor:
    """min over memory of (1 - cos), as ``vlmad.methods.ops.min_cosine_distance`` without its Python chunk loop.

    Args:
        queries: (B, N, C).
        memory: (M, C) already L2-normalised (done once at export).

    Returns:
        (B, N) distances in [0, 2].
    """
    return 1 - (F.normalize(queries, dim=-1) @ memory.T).amax(dim=-1)


class WinCLIPGraph(nn.Module):
    """WinCLIP / WinCLIP+ for one class: text prototypes and the few-shot memory as buffers."""

    def __init__(self, method: WinCLIP, class_name: str) -> None:
        super().__init__()
        self.method = method
        self.register_buffer("prototypes", method.text_prototypes(class_name).detach().clone())  # (2, D)
        self.levels = list(method.few_shot_levels) if method.k_shot > 0 else []
        memory = method.memory.get(class_name, {})
        for level in self.levels:
            self.register_buffer(f"memory_{level}", F.normalize(memory[level], dim=-1))  # (K·n, C)

    def few_shot_grid(self, patch_tokens: Tensor, window_emb: dict[int, Tensor]) -> Tensor:
        """(B, G, G) mean of the level maps (``WinCLIP.few_shot_grid`` for a single class)."""
        m, grid = self.method, self.method.backbone.grid_size
        maps = []
        for level in self.levels:
            memory = getattr(self, f"memory_{level}")
            if level == "patch":
                maps.append((_nearest_memory(patch_tokens, memory) / 2).view(-1, grid, grid))
            else:
                maps.append(m.harmonic_aggregate(_nearest_memory(window_emb[level], memory) / 2, level))
        return torch.stack(maps).mean(dim=0)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """``WinCLIP.encode`` with every window in one transformer call.

        The method's memory-bounding chunk loop would fix the number of chunks (and so the batch) in the graph.
        """
        m = self.method
        tokens = m.backbone.embed(images)  # (B, 1+P, W)
        final = m.backbone.visual.ln_post(m.backbone.blocks(tokens)[0])  # (B, 1+P, W)
        window_emb = {}
        for k in m.scales:
            sequence = getattr(m, f"window_sequence_{k}")  # (n_win, 1+k²)
            windows = tokens[:, sequence].flatten(0, 1)  # (B·n_win, 1+k², W)
            cls = m.backbone.blocks(windows)[0][:, 0]  # (B·n_win, W)
            window_emb[k] = m.backbone.project(cls).view(tokens.shape[0], len(sequence), -1)  # (B, n_win, D)
        return final[:, 0] @ m.backbone.visual.proj, final[:, 1:], window_emb

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> scores (B,), maps (B, S, S), as ``WinCLIP.forward`` (without its finite check)."""
        m = self.method
        embedding, patch_tokens, window_emb = self.encode(images)
        image_scores = m.class_scores(embedding[:, None], self.prototypes)[:, 0]  # (B,)
        window_scores = {k: m.class_scores(e, self.prototypes) for k, e in window_emb.items()}  # (B, n_win)
        grid_map = m.zero_shot_grid(image_scores, window_scores)  # (B, G, G)
        scores = image_scores
        if self.levels:
            few = self.few_shot_grid(patch_tokens, window_emb)  # (B, G, G)
            grid_map = m._fuse(grid_map, few)
            scores = m._fuse(image_scores, few.flatten(1).amax(dim=1))
        if m.image_score == "map_max":
            scores = grid_map.flatten(1).amax(dim=1)
        pixel = F.interpolate(grid_map[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        pixel = gaussian_blur(pixel, m.smoothing_sigma)  # (B, S, S)
        return scores.clamp(0, 1), pixel.clamp(0, 1)


class AnomalyCLIPGraph(nn.Module):
    """AnomalyCLIP (DPAM image side): the two learned prompts' text features as a buffer."""

    def __init__(self, method: AnomalyCLIP) -> None:
        super().__init__()
        self.method = method
        with torch.no_grad():
            self.register_buffer("text", method.text_features().detach().clone())  # (2, D)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> scores (B,), maps (B, S, S), as ``AnomalyCLIP.forward`` in eval mode."""
        m, grid, size = self.method, self.method.backbone.grid_size, self.method.backbone.image_size
        features = m.encode_images(images)
        score = m.image_logits(features, self.text).softmax(dim=-1)[:, 1]  # (B,)
        similarity = m.similarity(features, self.text)[:, :, 1:]  # (B, L, P, 2)
        # upsampled_probabilities with the grid side from the backbone (it derives it from a traced shape).
        grids = similarity.reshape(-1, grid, grid, 2).permute(0, 3, 1, 2)  # (B·L, 2, G, G)
        up = F.interpolate(grids, size=(size, size), mode="bilinear", align_corners=False)
        maps = up.reshape(images.shape[0], -1, 2, size, size)[:, :, 1]  # (B, L, S, S)
        maps = maps.mean(dim=1) if m.layer_reduce == "mean" else maps.sum(dim=1)
        sigma = scaled_sigma(m.smoothing_sigma, size, m.smoothing_reference_size)
        return score, gaussian_blur(maps, sigma)


@contextmanager
def _patched(obj: object, **attrs: Any) -> Iterator[None]:
    """Instance attributes set for the duration of a call (the method object is left as it was)."""
    for name, value in attrs.items():
        object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        for name in attrs:
            object.__delattr__(obj, name)


class AprilGANGraph(nn.Module):
    """APRIL-GAN zero-/k-shot for one class: text prototypes and the per-stage memory as buffers.

    ``AprilGAN.forward`` itself runs, with its two per-class-name steps (a Python loop over the batch's names)
    swapped for the stored class's constants, so the graph keeps a dynamic batch axis.
    """

    def __init__(self, method: AprilGAN, class_name: str) -> None:
        super().__init__()
        self.method, self.class_name = method, class_name
        self.register_buffer("text", method.text_features(class_name).detach().clone())  # (2, D)
        if method.k_shot:
            self.register_buffer("memory", F.normalize(method._memory[class_name], dim=-1))  # (n_fs, K·P, W)

    def few_shot_maps(self, stage_tokens: Tensor, class_names: object = None) -> Tensor:
        """(B, n_fs, P, W) -> (B, n_fs, S, S) upsampled memory distances (``AprilGAN.few_shot_maps``)."""
        m = self.method
        dist = torch.stack([_nearest_memory(stage_tokens[:, s], mem) for s, mem in enumerate(self.memory)], 1)
        n, g, size = dist.shape[1], m.backbone.grid_size, m.backbone.image_size  # dist: (B, n_fs, P)
        return m._upsample(dist.reshape(-1, 1, g, g)).reshape(-1, n, size, size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> scores (B,), maps (B, S, S), as ``AprilGAN.forward``."""
        batch = images.shape[0]
        with _patched(
            self.method,
            _batch_text_features=lambda names: self.text.expand(batch, -1, -1),
            few_shot_maps=self.few_shot_maps,
        ):
            pred = self.method(images, [self.class_name])
        return pred.pred_score, pred.anomaly_map


def export_graph(method: AnomalyMethod, class_name: str) -> nn.Module:
    """The per-image graph of a method already ``prepare``-d for ``class_name`` (eval mode).

    Raises:
        ExportError: transductive methods and unknown method types.
    """
    if getattr(method, "transductive", False):
        hint = " or method.image_fusion=fixed (a per-image k-shot score)" if isinstance(method, AprilGAN) else ""
        raise ExportError(
            f"{type(method).__name__} is transductive here (it scores a category's images together), so it has no "
            f"per-image graph to export: score it with vlmad predict (torch backend){hint}."
        )
    method = method.eval()
    if isinstance(method, WinCLIP):
        graph: nn.Module = WinCLIPGraph(method, class_name)
    elif isinstance(method, AnomalyCLIP):
        graph = AnomalyCLIPGraph(method)
    elif isinstance(method, AprilGAN):
        graph = AprilGANGraph(method, class_name)
    else:
        raise ExportError(f"no export graph for {type(method).__name__} (exportable: WinCLIP, AnomalyCLIP, AprilGAN)")
    return graph.eval()


# ------------------------------------------------------------------ files
def export_onnx(graph: nn.Module, path: Path, image_size: int) -> None:
    """Write the graph as ONNX with a dynamic batch axis (input ``images`` (B, 3, S, S)).

    PyTorch's TorchScript-based exporter is used: the dynamo exporter gives the same graph but took ~40x longer
    (minutes for the tiny backbone) on our machines. The example batch is 2: a batch of 1 can be specialised.
    """
    example = torch.zeros(2, 3, image_size, image_size, device=next(graph.buffers()).device)
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
        scores, maps = (t.float().cpu().numpy() for t in graph(images.to(next(graph.buffers()).device)))
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
        references, ref_paths = load_references(cfg, preprocess)
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
    export(cfg)


if __name__ == "__main__":
    main()
