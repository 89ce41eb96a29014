"""Input pipeline vs model: images/s of decoding + resizing + normalising through the real dataset and DataLoader.

A generated MVTec-format category (PNG images and masks larger than the model input, as MVTec's 700-1024 px
files) is read by ``AnomalyDataModule.test_dataloader`` at 518 px with 0 and N workers; the model row is
AnomalyCLIP's forward at the same size (ViT-L-14-336-quickgelu, random weights: batch 1 fp32 on the CPU, batch 32
bf16 on a GPU). Whichever rate is lower limits an evaluation.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch

from vlmad.data.datamodule import AnomalyDataModule, default_num_workers
from vlmad.data.synthetic import Synthetic


def loader_rate(reader: Synthetic, image_size: int, workers: int, batch_size: int) -> float:
    """Images/s of one pass over the category's test loader (worker start-up included, as in a real run)."""
    dm = AnomalyDataModule(reader, image_size=image_size, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    n = sum(len(batch["image"]) for loader in dm.test_dataloader() for batch in loader)
    return n / (time.perf_counter() - start)


def model_rate(image_size: int, model: str, device: torch.device) -> tuple[float, str]:
    """Images/s of AnomalyCLIP forward at ``image_size`` (warm-up, then timed) and how it was measured."""
    from vlmad.backbones import ClipBackbone
    from vlmad.methods.anomalyclip import AnomalyCLIP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: speed only
        backbone = ClipBackbone(model, None, image_size=image_size, pos_embed_interpolation="bilinear")
    depth = backbone.depth  # paper setting for ViT-L: last block, DPAM from block 5 of 24, scaled to other depths
    text_depth = len(backbone.model.transformer.resblocks)
    method = (
        AnomalyCLIP(
            backbone, feature_layers=[depth - 1], dpam_start=round(5 * depth / 24), deep_prompt_depth=min(9, text_depth)
        )
        .eval()
        .to(device)
    )
    cuda = device.type == "cuda"
    batch, dtype = (32, torch.bfloat16) if cuda else (1, torch.float32)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=cuda):
        method.prepare("object")
        method(images, ["object"] * batch)  # warm-up (kernel selection, allocator)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        method(images, ["object"] * batch)
        if cuda:
            torch.cuda.synchronize(device)
    setting = f"AnomalyCLIP {model} b{batch} {'bf16' if cuda else 'fp32'} {image_size} px, {device.type}"
    return batch / (time.perf_counter() - start), setting


def run(
    image_size: int = 518,
    n_images: int = 24,
    source_size: int = 640,
    batch_size: int = 8,
    model: str = "ViT-L-14-336-quickgelu",
    model_rate_given: tuple[float, str] | None = None,
) -> list[dict]:
    """Loader images/s with 0 and N workers, and the model's images/s, at ``image_size``.

    ``model_rate_given`` = (images/s, how it was measured) reuses a number measured elsewhere (``make bench``
    passes the ``anomalyclip`` section's 518 px figure) instead of building and timing the model here.

    Returns:
        rows ``{"stage", "setting", "images_per_s"}``; the last row names the limiting stage.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        half = n_images // 2  # anomalous images bring a mask to decode and resize too
        reader = Synthetic(
            Path(tmp),
            categories=["carpet_syn"],
            image_size=source_size,
            n_train=1,
            n_test_good=n_images - half,
            n_test_defect=half,
        )
        for workers in sorted({0, max(2, default_num_workers())}):
            rate = loader_rate(reader, image_size, workers, batch_size)
            rows.append(
                {
                    "stage": "input pipeline",
                    "setting": f"{source_size} px PNG -> {image_size} px, {workers} workers",
                    "images_per_s": rate,
                }
            )
    rate, setting = model_rate_given or model_rate(image_size, model, device)
    rows.append({"stage": "model", "setting": setting, "images_per_s": rate})
    best_loader = max(r["images_per_s"] for r in rows[:-1])
    limit = "model" if rate < best_loader else "input pipeline"
    rows.append({"stage": "limit", "setting": limit, "images_per_s": min(rate, best_loader)})
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of :func:`run` rows."""
    lines = [f"{'stage':<16} {'setting':<72} {'images/s':>9}"]
    lines += [f"{r['stage']:<16} {r['setting']:<72} {r['images_per_s']:>9.3g}" for r in rows]
    return "\n".join(lines)
