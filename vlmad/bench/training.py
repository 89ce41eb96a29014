"""Training seconds per epoch with and without the frozen-feature cache (random weights, CPU)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L


class _EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._t)


def run(
    method: str = "anomalyclip",
    backbone: str = "vit_l14_336",
    image_size: int = 336,
    n_images: int = 4,
    epochs: int = 3,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """Fit ``method`` for ``epochs`` on a generated VisA-format set, uncached then with the memory cache.

    Returns:
        rows with per-epoch seconds and the final training loss of each run (they must be equal).
    """
    from vlmad.config import compose as compose_run
    from vlmad.engine.run import build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for cached in (False, True):
            overrides = [
                f"method={method}",
                f"backbone={backbone}",
                "backbone.pretrained=null",
                f"backbone.image_size={image_size}",
                "data=synthetic_visa",
                f"data.root={tmp / 'visa'}",
                "data.categories=[candle_syn]",
                f"data.n_test_good={n_images // 2}",
                f"data.n_test_defect={n_images - n_images // 2}",
                "test_data=synthetic_visa",
                f"test_data.root={tmp / 'visa'}",
                f"trainer.max_epochs={epochs}",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "~callbacks",
                *extra,
            ]
            if cached:
                overrides.append("module.feature_cache=memory")
            cfg = compose_run("train", overrides, tmp / f"run_{cached}")
            objects = build(cfg, fit=True)
            timer = _EpochTimer()
            objects["trainer"].callbacks.append(timer)
            objects["trainer"].fit(objects["module"], datamodule=objects["datamodule"])
            loss = float(objects["trainer"].callback_metrics["train/loss_epoch"])
            cache = objects["module"].feature_cache
            rows.append(
                {
                    "method": method,
                    "backbone": cfg.backbone.model_name,
                    "image_size": image_size,
                    "images": n_images,
                    "cache": cached,
                    "epoch_seconds": timer.seconds,
                    "final_loss": loss,
                    "cache_report": cache.report() if cache is not None else "",
                }
            )
    return rows


def format_rows(rows: list[dict]) -> str:
    """Human-readable lines."""
    lines = []
    for r in rows:
        epochs = ", ".join(f"{s:.2f}" for s in r["epoch_seconds"])
        lines.append(
            f"{r['method']} {r['backbone']} {r['image_size']}px, {r['images']} images, cache={r['cache']}: "
            f"epoch seconds [{epochs}], final loss {r['final_loss']:.6f} {r['cache_report']}"
        )
    return "\n".join(lines)
