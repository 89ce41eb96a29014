"""WinCLIP timing: seconds per image against a bare ``encode_image`` pass (random weights, real architecture).

The window passes see ≈12× the tokens of one CLIP forward (2 670 vs 226 at 240 px), so a zero-shot ratio
near 13 is the floor for an implementation that re-encodes windows; anomalib takes ≈3.95 s/image at batch 1
on a 2-core CPU.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from vlmad.backbones import ClipBackbone
from vlmad.methods.winclip import WinCLIP


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _per_image(fn: Callable[[Tensor], object], images: Tensor, batch_size: int) -> float:
    batches = images.split(batch_size)
    fn(batches[0])  # warm-up (allocator, kernel selection)
    # Fastest batch: on a shared machine other jobs only ever add time.
    return min(_seconds(lambda b=b: fn(b)) / len(b) for b in batches)


def run(
    batch_sizes: tuple[int, ...] = (1, 8),
    n_images: int = 8,
    threads: int | None = None,
    backbone_name: str = "ViT-B-16-plus-240",
) -> list[dict]:
    """Time WinCLIP against the bare image encoder.

    Args:
        batch_sizes: batch sizes of the forward passes.
        n_images: images timed per batch size (after one warm-up batch).
        threads: torch CPU threads (None: leave as is).
        backbone_name: open_clip architecture, built with random weights.

    Returns:
        rows with ``measure``, ``batch_size``, ``seconds`` (per image of the fastest batch for forwards,
        per call for ``prepare``), ``ratio`` (to bare ``encode_image`` per image at the same batch size,
        batch 1 for ``prepare``) and, for ``prepare``, ``text_calls`` (``encode_text`` calls made).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning: timing only
        backbone = ClipBackbone(backbone_name, pretrained=None)
    size = backbone.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, 3, size, size, generator=gen)
    refs = torch.randn(2, 1, 3, size, size, generator=gen)
    text_calls = [0]
    encode_text = backbone.encode_text

    def counting_encode_text(tokens: Tensor) -> Tensor:
        text_calls[0] += 1
        return encode_text(tokens)

    backbone.encode_text = counting_encode_text  # instance attribute, removed below
    rows: list[dict] = []
    try:
        with torch.inference_mode():
            zero, one = WinCLIP(backbone), WinCLIP(backbone, k_shot=1)
            one.text_cache = zero.text_cache
            one.prepare("warm-up", refs[0])  # warm-up of text and reference encoding
            prepare = {}
            for measure, call in [
                ("prepare_text", lambda: zero.prepare("object")),  # first call for a class: text only
                ("prepare_refs", lambda: one.prepare("object", refs[1])),  # text cached: references only
            ]:
                before = text_calls[0]
                prepare[measure] = (_seconds(call), text_calls[0] - before)
            for bs in batch_sizes:
                bare = _per_image(backbone.model.encode_image, images, bs)
                timed = {
                    "encode_image": bare,
                    "zero_shot": _per_image(lambda x: zero(x, ["object"] * len(x)), images, bs),
                    "one_shot": _per_image(lambda x: one(x, ["object"] * len(x)), images, bs),
                }
                rows += [{"measure": m, "batch_size": bs, "seconds": s, "ratio": s / bare} for m, s in timed.items()]
        bare1 = next(r["seconds"] for r in rows if r["measure"] == "encode_image")
        rows += [
            {"measure": m, "batch_size": 1, "seconds": s, "ratio": s / bare1, "text_calls": n}
            for m, (s, n) in prepare.items()
        ]
    finally:
        del backbone.encode_text
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`run` rows."""
    lines = [f"{'measure':<14}{'batch':>6}{'seconds':>10}{'ratio':>8}  note"]
    for r in rows:
        unit = "s/call" if r["measure"].startswith("prepare") else "s/image"
        note = f"{unit}" + (f", encode_text calls {r['text_calls']}" if "text_calls" in r else "")
        lines.append(f"{r['measure']:<14}{r['batch_size']:>6}{r['seconds']:>10.4f}{r['ratio']:>8.2f}  {note}")
    return "\n".join(lines)
