"""Fit time of the default feature cache (``module.feature_cache=auto``) against the uncached path, and the
agreement of its bf16 storage with fp32 (random weights; CPU unless a GPU is present). The uncached run is the
fp32 reference: fp32 storage reproduces it exactly (tests/integration/test_feature_cache_auto.py)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

# (label, overrides): the uncached path (= fp32 storage, exactly), the default (auto, bf16 storage)
RUNS = (
    ("uncached", ["module.feature_cache=null"]),
    ("default", []),
)


class _EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._t)
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def run(
    method: str = "anomalyclip",
    backbone: str = "vit_l14_336",
    image_size: int = 518,
    n_images: int = 2,
    epochs: int = 15,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """Fit ``method`` for ``epochs`` on a generated VisA-format set: uncached, then with the default cache.

    Returns:
        one row per run: per-epoch seconds and losses, the fit seconds (incl. the cache's size probe and choice),
        the cache line, and the largest difference of the learned tensors and losses to the uncached run.
    """
    from vlmad.config import compose as compose_run
    from vlmad.engine.run import build

    rows, learned = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, overrides in RUNS:
            cfg = compose_run(
                "train",
                [
                    f"method={method}",
                    f"backbone={backbone}",
                    "backbone.pretrained=null",
                    f"backbone.image_size={image_size}",
                    "data=synthetic_visa",
                    f"data.root={tmp / 'visa'}",
                    "data.categories=[candle_syn]",
                    f"data.n_test_good={n_images // 2}",
                    f"data.n_test_defect={n_images - n_images // 2}",
                    "test_data=synthetic_visa",  # the same generated tree (only fitted on here)
                    f"test_data.root={tmp / 'visa'}",
                    "test_data.categories=[candle_syn]",
                    f"test_data.n_test_good={n_images // 2}",
                    f"test_data.n_test_defect={n_images - n_images // 2}",
                    f"trainer.max_epochs={epochs}",
                    "trainer.accelerator=auto",
                    "trainer.enable_progress_bar=false",
                    "~callbacks",
                    *extra,
                    *overrides,
                ],
                tmp / f"run_{len(rows)}",
            )
            objects = build(cfg, fit=True)
            timer = _EpochTimer()
            objects["trainer"].callbacks.append(timer)
            choice, logger = _LineCatcher("feature cache: "), logging.getLogger("vlmad.engine.module")
            level = logger.level
            logger.addHandler(choice)
            logger.setLevel(logging.INFO)
            start = time.perf_counter()
            try:
                objects["trainer"].fit(objects["module"], datamodule=objects["datamodule"])
            finally:
                logger.removeHandler(choice)
                logger.setLevel(level)
            seconds = time.perf_counter() - start
            learned[label] = {k: v.detach().float().cpu() for k, v in objects["method"].learned_state().items()}
            rows.append(
                {
                    "run": label,
                    "method": method,
                    "backbone": cfg.backbone.model_name,
                    "image_size": image_size,
                    "images": n_images,
                    "device": str(objects["method"].backbone.device),
                    "fit_seconds": seconds,
                    "epoch_seconds": timer.seconds,
                    "losses": timer.losses,
                    "cache": choice.line or "feature cache: off (module.feature_cache=null)",
                }
            )
    exact = next(r for r in rows if r["run"] == "uncached")
    for row in rows:  # bf16 storage against the exact path
        diffs = [(learned[row["run"]][k] - v).abs().max().item() for k, v in learned["uncached"].items()]
        row["max_learned_diff"] = max(diffs)
        row["max_learned_abs"] = max(v.abs().max().item() for v in learned["uncached"].values())
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], exact["losses"], strict=True))
        row["epoch1_loss_diff"] = abs(row["losses"][0] - exact["losses"][0])
    return rows


class _LineCatcher(logging.Handler):
    """Keeps the last log message that starts with ``prefix`` (the cache's choice line)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.prefix, self.line = prefix, ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.line = record.getMessage()


def format_rows(rows: list[dict]) -> str:
    """Human-readable lines: fit seconds and speed-up against the uncached run, agreement with the exact path."""
    uncached = next(r["fit_seconds"] for r in rows if r["run"] == "uncached")
    r0 = rows[0]
    lines = [
        f"{r0['method']} {r0['backbone']} RANDOM weights, {r0['image_size']} px, {r0['images']} images, "
        f"{len(r0['epoch_seconds'])} epochs, {r0['device']}, {torch.get_num_threads()} threads"
    ]
    for r in rows:
        epochs = ", ".join(f"{s:.1f}" for s in r["epoch_seconds"])
        lines.append(
            f"  {r['run']:<10} fit {r['fit_seconds']:8.1f} s  x{uncached / r['fit_seconds']:5.2f}  "
            f"vs uncached: learned max|d| {r['max_learned_diff']:.2e} (of max|w| {r['max_learned_abs']:.2e}), "
            f"loss max|d| {r['max_loss_diff']:.2e} "
            f"(epoch 1 {r['epoch1_loss_diff']:.2e}), final loss {r['losses'][-1]:.6f}\n"
            f"             epochs [{epochs}] s\n             {r['cache']}"
        )
    return "\n".join(lines)
