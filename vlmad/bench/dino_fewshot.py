"""AnomalyDINO and SubspaceAD timing: s/image against the bare DINOv2 pass, and the reference set-up per k.

Per method at its paper backbone and size (random weights: they cost what trained weights cost): the fastest
batch-1 time of the bare timm ``forward_features`` (all blocks, final norm), of the method's own backbone use
(``encode_images``: SubspaceAD stops after its deepest tap) and of the whole ``forward`` (features + kNN / PCA
residual + maps + image score), interleaved so machine load hits all alike; and of the scoring alone (``forward``
on precomputed features, per k): ``overhead`` = score / bare pass (target <= 10 %). Set-up per k: making the
reference views at the original resolution (AnomalyDINO: 8 rotations each; SubspaceAD: 2 PCA passes of
1 + ``aug_count`` random rotations), preprocessing them and ``prepare`` (encoding, memory bank / two-pass float64
PCA), timed once.
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import torch
from PIL import Image

from vlmad.backbones import DinoBackbone
from vlmad.bench.anomalyclip import interleaved_seconds
from vlmad.data.transforms import Preprocess
from vlmad.methods.anomalydino import AnomalyDINO
from vlmad.methods.subspacead import SubspaceAD

# name -> (timm architecture, paper size, position-table resize, image resize)
PAPER = {
    "anomalydino": ("vit_small_patch14_dinov2", 448, "dinov2_hub", "pil"),
    "subspacead": ("vit_giant_patch14_reg4_dinov2", 672, "timm", "torchvision"),
}


def build(name: str, image_size: int | None = None, backbone_name: str | None = None, **settings) -> object:
    """The method at its paper backbone and size (random weights), or another backbone / size."""
    arch, size, interpolation, resize = PAPER[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: timing only
        backbone = DinoBackbone(
            backbone_name or arch,
            image_size=image_size or size,
            pos_embed_interpolation=interpolation,
            image_resize=resize,
        )
    cls = AnomalyDINO if name == "anomalydino" else SubspaceAD
    return cls(backbone, **settings).eval()


def _synced(fn, device: torch.device):
    """``fn`` followed by a CUDA synchronisation (so a wall-clock timer sees the kernels), as is on a CPU."""
    if device.type != "cuda":
        return fn

    def call(images: torch.Tensor) -> object:
        out = fn(images)
        torch.cuda.synchronize(device)
        return out

    return call


def setup_seconds(method, k: int, source_size: int) -> tuple[float, int]:
    """Seconds to make, preprocess and ``prepare`` the reference views of k random ``source_size`` originals."""
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (source_size, source_size, 3), dtype=np.uint8) for _ in range(k)]
    transform = Preprocess(**method.backbone.preprocess_config())
    draw = method.reference_draw("object")
    start = time.perf_counter()
    views = draw.views(originals, torch.Generator().manual_seed(0)) if draw.views is not None else originals
    images = torch.stack([transform(Image.fromarray(v), None)[0] for v in views])
    with torch.inference_mode():
        method.prepare("object", images.to(method.backbone.device))
    if method.backbone.device.type == "cuda":
        torch.cuda.synchronize(method.backbone.device)
    return time.perf_counter() - start, len(views)


def score_seconds(method, images: torch.Tensor, features: list[dict], repeats: int, device: torch.device) -> float:
    """Fastest batch-1 time of the scoring alone: ``forward`` on precomputed features (bank / PCA, maps, score)."""
    best = float("inf")
    with torch.inference_mode():
        for r in range(repeats):
            i = r % len(features)
            start = time.perf_counter()
            method(images[i : i + 1], ["object"], features=features[i])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best


def run(
    methods: tuple[str, ...] = ("anomalydino", "subspacead"),
    ks: tuple[int, ...] = (1, 2, 4),
    n_images: int = 2,
    warmup: int = 1,
    source_size: int = 1024,
    image_size: int | None = None,
    backbone_name: str | None = None,
    aug_count: int | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Time each method (batch 1) and its set-up for every k.

    Args:
        methods: ``anomalydino`` and/or ``subspacead``.
        ks: reference counts whose set-up is timed (scoring is timed on the largest k's bank / subspace).
        n_images: timed batch-1 calls per function.
        warmup: untimed calls per function.
        source_size: side of the random original reference images (MVTec-AD's largest is 1024).
        image_size: input side instead of the paper's (e.g. smaller to check the harness on a CPU).
        backbone_name: another DINOv2 (e.g. ``vlmad-tiny-dinov2``) instead of the paper's.
        aug_count: SubspaceAD's rotations per reference and pass instead of the reference's 30.
        device: ``cpu`` or ``cuda`` (timed between synchronisations).

    Returns:
        one row per (method, k): backbone, size, k, views, setup_s, score_s (scoring alone with that k's bank /
        subspace) and overhead = score_s / bare_s; the per-image times bare_s, encode_s and forward_s (with the
        largest k) repeated on every row of the method.
    """
    rows = []
    for name in methods:
        settings = {"aug_count": aug_count} if name == "subspacead" and aug_count is not None else {}
        dev = torch.device(device)
        method = build(name, image_size, backbone_name, k_shot=max(ks), **settings).to(dev)
        size = method.backbone.image_size
        images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.inference_mode():
            features = [method.encode_images(images[i : i + 1]) for i in range(n_images)]
        setups, scoring = {}, {}
        for k in sorted(ks):  # the largest k's bank / subspace stays prepared for the whole-forward timing
            method.k_shot = k
            setups[k] = setup_seconds(method, k, source_size)
            scoring[k] = score_seconds(method, images, features, repeats=max(3, warmup + n_images), device=dev)
        with torch.inference_mode():
            fns = [
                method.backbone.model.forward_features,
                method.encode_images,
                functools.partial(method, class_names=["object"]),
            ]
            bare_s, encode_s, forward_s = interleaved_seconds([_synced(f, dev) for f in fns], images, warmup)
        for k, (seconds, views) in setups.items():
            rows.append(
                {
                    "method": name,
                    "backbone": method.backbone.model_name,
                    "size": size,
                    "k": k,
                    "views": views,
                    "setup_s": seconds,
                    "bare_s": bare_s,
                    "encode_s": encode_s,
                    "forward_s": forward_s,
                    "score_s": scoring[k],
                    "overhead": scoring[k] / bare_s,
                    "device": device,
                    "threads": torch.get_num_threads(),
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of :func:`run` rows."""
    head = (
        f"{'method':<12}{'backbone':<32}{'size':>5}{'k':>3}{'views':>6}{'setup s':>9}"
        f"{'bare s/img':>11}{'encode s/img':>13}{'forward s/img':>14}{'score s/img':>12}{'overhead':>9}"
    )
    lines = [head]
    lines += [
        f"{r['method']:<12}{r['backbone']:<32}{r['size']:>5}{r['k']:>3}{r['views']:>6}{r['setup_s']:>9.2f}"
        f"{r['bare_s']:>11.3f}{r['encode_s']:>13.3f}{r['forward_s']:>14.3f}{r['score_s']:>12.4f}"
        f"{100 * r['overhead']:>8.1f}%"
        for r in rows
    ]
    return "\n".join(lines)
