"""AnomalyCLIP inference cost vs a bare CLIP image pass (random weights, batch 1).

DPAM adds one V-V attention per dual-path block (≈40 % FLOPs for ViT-L at 518 px), so ≈1.4 is the
floor of the ratio; the maps (upsampling, Gaussian) add a little on top. Text features are computed once
per evaluation (``prepare``) and are not timed.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from vlmad.backbones import ClipBackbone
from vlmad.methods.anomalyclip import AnomalyCLIP


def interleaved_seconds(fns: list[Callable[[Any], object]], images: Any, warmup: int) -> list[float]:
    """Fastest single-image time of each function on ``images`` (a tensor or array, sliced per image); calls
    alternate so that load from other processes on a shared machine hits all of them alike, and the minimum
    discards the slowed calls."""
    for _ in range(warmup):
        for fn in fns:
            fn(images[:1])
    best = [float("inf")] * len(fns)
    for i in range(len(images)):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn(images[i : i + 1])
            best[j] = min(best[j], time.perf_counter() - start)
    return best


def run(
    image_sizes: tuple[int, ...] = (336, 518),
    n_images: int = 2,
    backbone_name: str = "ViT-L-14-336-quickgelu",
    warmup: int = 1,
) -> list[dict]:
    """Time AnomalyCLIP ``forward`` and ``backbone.model.encode_image`` at each size, batch 1.

    Args:
        image_sizes: square input sides (multiples of the patch size).
        n_images: timed images per size.
        backbone_name: open_clip architecture, built with random weights.
        warmup: untimed calls per function and size.

    Returns:
        One row per size: backbone, image_size, n_images, device, threads, clip_s, anomalyclip_s (seconds per
        image, fastest of ``n_images`` batch-1 calls) and ratio = anomalyclip_s / clip_s.
    """
    rows = []
    for size in image_sizes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-weights warning is expected here
            backbone = ClipBackbone(backbone_name, None, image_size=size, pos_embed_interpolation="bilinear")
        depth, text_depth = backbone.depth, len(backbone.model.transformer.resblocks)
        # Paper setting for ViT-L (last layer, DPAM from block 5 of 24), scaled to other depths.
        method = AnomalyCLIP(
            backbone,
            feature_layers=[depth - 1],
            dpam_start=round(5 * depth / 24),
            deep_prompt_depth=min(9, text_depth),
        ).eval()
        method.prepare("object")
        images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            clip_s, method_s = interleaved_seconds(
                [backbone.model.encode_image, functools.partial(method, class_names=["object"])], images, warmup
            )
        rows.append(
            {
                "backbone": backbone_name,
                "image_size": size,
                "n_images": n_images,
                "device": str(backbone.device),
                "threads": torch.get_num_threads(),
                "clip_s": clip_s,
                "anomalyclip_s": method_s,
                "ratio": method_s / clip_s,
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of :func:`run` rows."""
    lines = [f"{'backbone':<24} {'size':>5} {'n':>3} {'clip s/img':>11} {'anomalyclip s/img':>18} {'ratio':>6}"]
    lines += [
        f"{r['backbone']:<24} {r['image_size']:>5} {r['n_images']:>3} {r['clip_s']:>11.3f} "
        f"{r['anomalyclip_s']:>18.3f} {r['ratio']:>6.2f}"
        for r in rows
    ]
    return "\n".join(lines)
