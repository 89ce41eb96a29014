"""MuSc timing: encode vs mutual scoring of one generated category, and the scoring's FLOP/s vs a plain matmul.

MuSc's cost is the all-pairs patch distances: per (r, tap) every image pair's (L x C) @ (C x L) cosine block,
12 of them at the paper's 4 taps x 3 degrees. The floor is a bare matmul of the same block shape on the same
device; ``rate_ratio`` = achieved scoring FLOP/s (matmul FLOPs performed / whole scoring time, i.e. including
LNAMD, the max reductions, top-k and the maps) over that floor. Random weights cost what trained weights cost.
"""

from __future__ import annotations

import resource
import time
import warnings

import torch

from vlmad.backbones import ClipBackbone
from vlmad.methods.musc import PRECISIONS, MuSc


def distance_flops(n: int, length: int, width: int, chunk: int) -> float:
    """Matmul FLOPs of one (r, tap) in :func:`vlmad.methods.musc.nearest_patch_distances` (upper block triangle)."""
    sizes = [min(chunk, n - a) for a in range(0, n, chunk)]
    rows = sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i, len(sizes)))
    return 2.0 * rows * length * length * width


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(rows: int, width: int, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of a bare (rows, width) @ (width, rows) matmul (best of ``repeats``)."""
    a = torch.randn(rows, width, device=device).to(dtype)
    a @ a.T  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ a.T
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * rows * width / best


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process high-water mark


def run(
    n_images: int = 5,
    image_size: int = 518,
    backbone_name: str = "ViT-L-14-336",
    batch_size: int = 4,
    device: str = "cpu",
    precision: str = "fp32",
    distance_dtype: str = "fp32",
    threads: int | None = None,
) -> list[dict]:
    """Encode and score one category of ``n_images`` random images with MuSc's paper settings.

    Returns:
        one row: ``n``, ``size``, ``encode_s``, ``score_s``, ``total_s``, ``peak_mb`` (process RSS on CPU, CUDA
        allocator peak on a GPU), ``score_tflops`` (achieved), ``matmul_tflops`` (floor), ``rate_ratio``.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning: timing only
        backbone = ClipBackbone(backbone_name, image_size=image_size, pos_embed_interpolation="bicubic_no_antialias")
    backbone.to(dev)
    model = MuSc(backbone, precision=precision, distance_dtype=distance_dtype, rscin_windows=[1, 2, 3])
    images = torch.randn(n_images, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        _sync(dev)
        start = time.perf_counter()
        model.prepare("bench")
        for batch in images.split(batch_size):
            model.accumulate(batch.to(dev))
        _sync(dev)
        encoded = time.perf_counter()
        pred = model.score_accumulated()
        _sync(dev)
        scored = time.perf_counter()
    assert pred.pred_score.shape == (n_images,)
    length, width = backbone.grid_size**2, backbone.width
    chunk = model._chunk(torch.empty(1, length, 1, device=dev))
    flops = distance_flops(n_images, length, width, chunk) * len(model.r_list) * len(model.feature_layers)
    score_s = scored - encoded
    floor = matmul_rate(min(chunk, n_images) * length, width, dev, PRECISIONS[distance_dtype])
    return [
        {
            "n": n_images,
            "size": image_size,
            "device": device,
            "precision": f"{precision}/{distance_dtype}",
            "chunk": chunk,
            "encode_s": encoded - start,
            "score_s": score_s,
            "total_s": scored - start,
            "peak_mb": _peak_mb(dev),
            "score_tflops": flops / score_s / 1e12,
            "matmul_tflops": floor / 1e12,
            "rate_ratio": flops / score_s / floor,
        }
    ]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`run` rows."""
    head = (
        f"{'n':>4}{'size':>6}{'device':>7}{'precision':>11}{'chunk':>6}{'encode_s':>10}{'score_s':>9}"
        f"{'total_s':>9}{'peak_MB':>9}{'score_TF/s':>11}{'matmul_TF/s':>12}{'ratio':>7}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['n']:>4}{r['size']:>6}{r['device']:>7}{r['precision']:>11}{r['chunk']:>6}{r['encode_s']:>10.1f}"
            f"{r['score_s']:>9.1f}{r['total_s']:>9.1f}{r['peak_mb']:>9.0f}{r['score_tflops']:>11.3f}"
            f"{r['matmul_tflops']:>12.3f}{r['rate_ratio']:>7.2f}"
        )
    return "\n".join(lines)
