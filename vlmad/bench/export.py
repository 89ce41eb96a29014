"""CPU images/s of each method in torch, ONNX Runtime and OpenVINO side by side (random weights, batch 1).

Each method runs at its paper backbone and size: WinCLIP on ViT-B-16-plus-240 at 240 px, AnomalyCLIP (DPAM) on
ViT-L-14-336-quickgelu at 518 px, APRIL-GAN on ViT-L-14-336 at 518 px. The method is exported exactly as
``vlmad export`` does (ONNX, then OpenVINO IR from it) into a temporary folder; the three runners use
the same number of CPU threads, and calls alternate so that load from other processes hits all of them alike
(the fastest call of each counts).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlmad import deploy
from vlmad.backbones import ClipBackbone
from vlmad.bench.anomalyclip import interleaved_seconds
from vlmad.deploy.export import ONNX_FILE, OPENVINO_FILE, export_graph, export_onnx, export_openvino
from vlmad.methods.anomalyclip import AnomalyCLIP
from vlmad.methods.aprilgan import AprilGAN
from vlmad.methods.base import AnomalyMethod
from vlmad.methods.winclip import WinCLIP

# name -> (open_clip architecture, image size, position-table interpolation, method builder)
PAPER = {
    "winclip": ("ViT-B-16-plus-240", 240, "bicubic", lambda b: WinCLIP(b)),
    "anomalyclip": ("ViT-L-14-336-quickgelu", 518, "bilinear", lambda b: AnomalyCLIP(b)),
    "aprilgan": ("ViT-L-14-336", 518, "bicubic", lambda b: AprilGAN(b)),
}


def _build(name: str, backbone_name: str | None) -> AnomalyMethod:
    arch, size, interp, make = PAPER[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is expected here
        backbone = ClipBackbone(
            backbone_name or arch, None, image_size=64 if backbone_name else size, pos_embed_interpolation=interp
        )
    if backbone_name:  # --quick: the tiny backbone, layers scaled to it
        kwargs = {
            "anomalyclip": {"feature_layers": [backbone.depth - 1], "dpam_start": 1, "deep_prompt_depth": 2},
            "aprilgan": {"feature_layers": [1, 3]},
        }.get(name, {})
        method = {"winclip": WinCLIP, "anomalyclip": AnomalyCLIP, "aprilgan": AprilGAN}[name](backbone, **kwargs)
    else:
        method = make(backbone)
    method.eval().prepare("object")
    return method


def run(
    methods: tuple[str, ...] = ("winclip", "anomalyclip", "aprilgan"),
    n_images: int = 2,
    warmup: int = 1,
    backbone_name: str | None = None,
) -> list[dict]:
    """Export each method and time torch ``forward``, ONNX Runtime and OpenVINO on batch-1 calls.

    Args:
        methods: keys of :data:`PAPER`.
        n_images: timed calls per runner (the fastest counts).
        warmup: untimed calls per runner.
        backbone_name: None = the paper backbones; e.g. ``vlmad-tiny`` to check the harness in seconds.

    Returns:
        One row per method: backbone, image_size, threads, export_s, torch/onnx/openvino images per second,
        onnx_ratio and openvino_ratio (exported images/s over torch images/s; > 1 = faster than torch).
    """
    threads = torch.get_num_threads()
    rows = []
    for name in methods:
        method = _build(name, backbone_name)
        size = method.backbone.image_size
        graph = export_graph(method, "object")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            start = time.perf_counter()
            export_onnx(graph, folder / ONNX_FILE, size)
            export_openvino(folder / ONNX_FILE, folder / OPENVINO_FILE)
            export_s = time.perf_counter() - start
            info = {
                **deploy.basic_manifest(size, [0.0] * 3, [1.0] * 3),
                "files": {"onnx": ONNX_FILE, "openvino": OPENVINO_FILE},
            }
            deploy.write_manifest(folder, info)
            onnx, openvino = (deploy.load(folder, b, threads=threads) for b in ("onnx", "openvino"))
            images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))

            def torch_call(x: np.ndarray, method: AnomalyMethod = method) -> object:
                with torch.inference_mode():
                    return method(torch.from_numpy(x), ["object"] * len(x))

            seconds = interleaved_seconds([torch_call, onnx.run, openvino.run], images.numpy(), warmup)
        torch_s, onnx_s, openvino_s = seconds
        rows.append(
            {
                "method": name,
                "backbone": method.backbone.model_name,
                "image_size": size,
                "threads": threads,
                "export_s": export_s,
                "torch_ips": 1 / torch_s,
                "onnx_ips": 1 / onnx_s,
                "openvino_ips": 1 / openvino_s,
                "onnx_ratio": torch_s / onnx_s,
                "openvino_ratio": torch_s / openvino_s,
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of :func:`run` rows."""
    head = f"{'method':<12} {'backbone':<24} {'size':>4} {'thr':>3} {'torch img/s':>11} {'onnx img/s':>10} "
    lines = [head + f"{'openvino img/s':>14} {'onnx/torch':>10} {'ov/torch':>8} {'export s':>8}"]
    lines += [
        f"{r['method']:<12} {r['backbone']:<24} {r['image_size']:>4} {r['threads']:>3} {r['torch_ips']:>11.3f} "
        f"{r['onnx_ips']:>10.3f} {r['openvino_ips']:>14.3f} {r['onnx_ratio']:>10.2f} {r['openvino_ratio']:>8.2f} "
        f"{r['export_s']:>8.0f}"
        for r in rows
    ]
    return "\n".join(lines)
