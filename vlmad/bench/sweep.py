"""A WinCLIP k-shot sweep (k x reference draws) without cache, with a cold disk cache, and with a warm one.

Test images' frozen features do not change between the jobs of a k-shot sweep (only the reference memory
does) and text prototypes do not change at all, so the disk cache removes every repeated image pass.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path


def _job(root: Path, out: Path, k: int, draw: int, backbone: str, image_size: int, cache: Path | None) -> dict:
    from vlmad.config import compose
    from vlmad.engine.run import evaluate

    overrides = [
        "method=winclip",
        f"method.k_shot={k}",
        f"backbone={backbone}",
        "backbone.pretrained=null",
        f"backbone.image_size={image_size}",
        "data=synthetic",
        f"data.root={root}",
        "data.categories=[bottle_syn]",
        f"data.image_size={image_size}",
        "data.n_train=8",
        "data.n_test_good=1",
        "data.n_test_defect=1",
        "seed=0",
        f"module.reference_seed={draw}",
        "module.num_overlays=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    if cache is not None:
        overrides.append(f"module.feature_cache={cache}")
    results, _ = evaluate(compose("evaluate", overrides, out / f"k{k}_draw{draw}_{cache is not None}"))
    return results["mean"]


def run(ks=(1, 2, 4), draws: int = 3, backbone: str = "vit_b16_plus_240", image_size: int = 240) -> list[dict]:
    """Time the sweep three ways; rows carry seconds and whether the metrics equal the uncached ones."""
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = None
        for mode, cache in (("no cache", None), ("cold cache", tmp / "cache"), ("warm cache", tmp / "cache")):
            start = time.perf_counter()
            means = [
                _job(tmp / "data", tmp / "out", k, d, backbone, image_size, cache) for k in ks for d in range(draws)
            ]
            seconds = time.perf_counter() - start
            baseline = baseline or means
            identical = all(abs(a[m] - b[m]) <= 1e-6 for a, b in zip(means, baseline, strict=True) for m in a)
            rows.append(
                {"mode": mode, "jobs": len(means), "seconds": seconds, "identical": identical, "backbone": backbone}
            )
    logging.disable(logging.NOTSET)
    return rows


def format_rows(rows: list[dict]) -> str:
    """Human-readable lines."""
    return "\n".join(
        f"{r['backbone']} sweep, {r['jobs']} jobs, {r['mode']:>10}: {r['seconds']:7.1f} s "
        f"(metrics equal to uncached: {r['identical']})"
        for r in rows
    )
