"""VisualAD speed (random weights): s/image against a bare CLIP image pass, and one training epoch against
AnomalyCLIP's uncached epoch on the same generated images.

Inference adds two tokens to the sequence and small per-layer modules (SCA, SAF, cosines, upsampling, blur), so
the target is <= 1.2x a bare ``encode_image``. Training is where VisualAD differs: its tokens run inside the tower,
so every step back-propagates through the frozen ViT and nothing can be cached, whereas AnomalyCLIP's image side
runs without grad (its uncached epoch is the fair comparison: same images, same forward count).
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from vlmad.backbones import ClipBackbone
from vlmad.bench.anomalyclip import interleaved_seconds
from vlmad.methods.visualad import VisualAD


def default_layers(depth: int) -> list[int]:
    """The reference's taps (1-based 6, 12, 18, 24 of 24 blocks) scaled to ``depth``: 0-based quarter ends."""
    return [depth * q // 4 - 1 for q in (1, 2, 3, 4)]


def inference(
    image_size: int = 518, n_images: int = 2, backbone_name: str = "ViT-L-14-336-quickgelu", warmup: int = 1
) -> dict:
    """Fastest batch-1 seconds of ``backbone.model.encode_image`` and of VisualAD's eval forward.

    Returns:
        backbone, image_size, n_images, device, threads, clip_s, visualad_s and ratio = visualad_s / clip_s.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is expected here
        backbone = ClipBackbone(backbone_name, None, image_size=image_size, pos_embed_interpolation="bilinear")
    method = VisualAD(backbone, feature_layers=default_layers(backbone.depth)).eval()
    images = torch.randn(n_images, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clip_s, method_s = interleaved_seconds(
            [backbone.model.encode_image, functools.partial(method, class_names=["object"])], images, warmup
        )
    return {
        "backbone": backbone_name,
        "image_size": image_size,
        "n_images": n_images,
        "device": str(backbone.device),
        "threads": torch.get_num_threads(),
        "clip_s": clip_s,
        "visualad_s": method_s,
        "ratio": method_s / clip_s,
    }


class _EpochSeconds(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def training(backbone: str = "vit_l14_336", image_size: int = 518, n_images: int = 8, batch_size: int = 8) -> list:
    """One uncached epoch of AnomalyCLIP, then of VisualAD, on the same generated VisA-format images (each at its
    shipped settings; both default backbones have 24 blocks).

    Returns:
        one row per method: method, backbone, image_size, images, batch, device, epoch_s, s_per_image.
    """
    from vlmad.config import compose
    from vlmad.engine.run import build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = [
            "data.categories=[candle_syn]",
            f"data.n_test_good={n_images // 2}",
            f"data.n_test_defect={n_images - n_images // 2}",
        ]
        for method in ("anomalyclip", "visualad"):
            overrides = [
                f"method={method}",
                f"backbone={backbone}",
                "backbone.pretrained=null",
                f"backbone.image_size={image_size}",
                "data=synthetic_visa",
                f"data.root={tmp / 'visa'}",
                *data,
                "test_data=synthetic_visa",
                f"test_data.root={tmp / 'visa'}",
                *(f"test_{d}" for d in data),
                "trainer.max_epochs=1",
                "trainer.accelerator=auto",
                "trainer.enable_progress_bar=false",
                "~callbacks",
                f"datamodule.batch_size={batch_size}",
                "module.feature_cache=null",  # AnomalyCLIP's uncached path; VisualAD has no cache
            ]
            cfg = compose("train", overrides, tmp / f"run_{method}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                objects = build(cfg, fit=True)
            timer = _EpochSeconds()
            objects["trainer"].callbacks.append(timer)
            objects["trainer"].fit(objects["module"], datamodule=objects["datamodule"])
            rows.append(
                {
                    "method": method,
                    "backbone": cfg.backbone.model_name,
                    "image_size": image_size,
                    "images": n_images,
                    "batch": batch_size,
                    "device": str(objects["method"].backbone.device),
                    "epoch_s": timer.seconds[0],
                    "s_per_image": timer.seconds[0] / n_images,
                }
            )
    return rows


def run(
    image_size: int = 518,
    n_images: int = 2,
    backbone_name: str = "ViT-L-14-336-quickgelu",
    training_backbone: str = "vit_l14_336",
    n_train: int = 8,
) -> list[dict]:
    """The inference row, then the two training rows."""
    return [
        {"section": "inference", **inference(image_size, n_images, backbone_name)},
        *({"section": "training", **r} for r in training(training_backbone, image_size, n_train, min(8, n_train))),
    ]


def format_rows(rows: list[dict]) -> str:
    """Plain-text tables of :func:`run` rows (RANDOM weights)."""
    lines = [f"{'backbone':<24} {'size':>5} {'n':>3} {'clip s/img':>11} {'visualad s/img':>15} {'ratio':>6}"]
    for r in (r for r in rows if r["section"] == "inference"):
        lines.append(
            f"{r['backbone']:<24} {r['image_size']:>5} {r['n_images']:>3} {r['clip_s']:>11.3f} "
            f"{r['visualad_s']:>15.3f} {r['ratio']:>6.2f}   ({r['device']}, {r['threads']} threads, RANDOM weights)"
        )
    train = [r for r in rows if r["section"] == "training"]
    if train:
        lines.append(f"\none training epoch, uncached ({train[0]['images']} images, batch {train[0]['batch']}):")
        base = next((r["epoch_s"] for r in train if r["method"] == "anomalyclip"), None)
        for r in train:
            ratio = f"  {r['epoch_s'] / base:.2f}x AnomalyCLIP" if base else ""
            lines.append(
                f"  {r['method']:<12} {r['backbone']} {r['image_size']} px {r['device']}: {r['epoch_s']:.2f} s "
                f"({r['s_per_image']:.3f} s/image){ratio}"
            )
    return "\n".join(lines)
