"""What the OK/NG threshold calibration costs against the evaluation it belongs to (issue: it must not tax
research runs). Times one evaluation of a generated category, old default (32 train/good images) against the
current one (``module.threshold.max_share`` 0.04), and prints what each rule scores on MVTec-AD and VisA."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

# test / train-good images per category of the published splits (MVTec-AD; VisA's 1-class split, train = normal)
MVTEC = {
    "bottle": (83, 209),
    "cable": (150, 224),
    "capsule": (132, 219),
    "carpet": (117, 280),
    "grid": (78, 264),
    "hazelnut": (110, 391),
    "leather": (124, 245),
    "metal_nut": (115, 220),
    "pill": (167, 267),
    "screw": (160, 320),
    "tile": (117, 230),
    "toothbrush": (42, 60),
    "transistor": (100, 213),
    "wood": (79, 247),
    "zipper": (151, 240),
}
VISA_TEST = {
    "candle": 200,
    "capsules": 160,
    "cashew": 150,
    "chewinggum": 150,
    "fryum": 150,
    "macaroni1": 200,
    "macaroni2": 200,
    "pcb1": 200,
    "pcb2": 200,
    "pcb3": 201,
    "pcb4": 201,
    "pipe_fryum": 150,
}
OLD = {"max_images": 32, "max_share": None}
NEW = {"max_images": 32, "max_share": 0.04}


def images_scored(n_test: int, n_train: int, max_images: int | None, max_share: float | None) -> int:
    """Calibration images of one category under a rule (as ``AnomalyModule._calibrate``, k_shot 0)."""
    limit = n_train if max_images is None else min(n_train, max_images)
    if max_share is not None:
        limit = min(limit, max(1, math.floor(max_share * n_test + 1e-9)))
    return limit


def dataset_rows() -> list[dict]:
    """Extra forward passes of each rule on MVTec-AD and VisA (VisA's train/good sets all hold > 32 images)."""
    sets = {"MVTec-AD": MVTEC, "VisA": {c: (n, 10**6) for c, n in VISA_TEST.items()}}
    rows = []
    for name, cats in sets.items():
        n_test = sum(t for t, _ in cats.values())
        for rule, settings in (("old", OLD), ("new", NEW)):
            extra = sum(images_scored(t, g, **settings) for t, g in cats.values())
            rows.append({"dataset": name, "rule": rule, "test": n_test, "calibration": extra})
    return rows


def run(
    method: str = "anomalyclip",
    backbone: str = "vit_b16_plus_240",
    image_size: int = 240,
    n_test: int = 83,
    n_train: int = 32,
    extra: tuple[str, ...] = ("method.feature_layers=[11]",),
    repeats: int = 3,
) -> list[dict]:
    """Evaluate one generated category of ``n_test`` test and ``n_train`` normal training images, timing the
    calibration (``AnomalyModule._calibrate``) inside the evaluation, under the old and the current default.
    The default sizes are MVTec-AD bottle's (83 test images; 32 = the old default's train/good images, of its 209):
    the current rule scores 3 of them in one batch. Every image costs one forward pass either way, so the ratio
    barely depends on the architecture: the default is a ViT-B (last block tapped) to keep the section short on a
    CPU. The paper-setting experiments skip the calibration (``module.threshold.calibrate: false``): 0 s there.

    Returns:
        one row per rule (seconds, images) plus the MVTec-AD / VisA image counts of :func:`dataset_rows`.
    """
    from vlmad.config import compose as compose_run
    from vlmad.engine.module import AnomalyModule
    from vlmad.engine.run import build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the current rule is timed `repeats` times (a CPU's per-image speed drifts by ~+-20 % between runs)
        for rule, settings in (("old", OLD), *(("new", NEW),) * repeats):
            share = "null" if settings["max_share"] is None else settings["max_share"]
            cfg = compose_run(
                "evaluate",
                [
                    f"method={method}",
                    f"backbone={backbone}",
                    "backbone.pretrained=null",
                    f"backbone.image_size={image_size}",
                    "data=synthetic",
                    f"data.root={tmp / 'mvtec'}",
                    "data.categories=[bottle_syn]",
                    f"data.n_train={n_train}",
                    f"data.n_test_good={n_test // 2}",
                    f"data.n_test_defect={n_test - n_test // 2}",
                    "trainer.accelerator=auto",
                    "trainer.enable_progress_bar=false",
                    "module.num_overlays=0",
                    f"module.threshold.max_images={settings['max_images']}",
                    f"module.threshold.max_share={share}",
                    *extra,
                ],
                tmp / f"run_{rule}_{len(rows)}",
            )
            objects = build(cfg, fit=False)
            module = objects["module"]
            spent: list[float] = []
            original = AnomalyModule._calibrate

            def timed(self, *args, original=original, spent=spent):
                start = time.perf_counter()
                try:
                    return original(self, *args)
                finally:
                    spent.append(time.perf_counter() - start)

            module._calibrate = timed.__get__(module)
            _warm_up(objects["method"], image_size)
            start = time.perf_counter()
            objects["trainer"].test(module, datamodule=objects["datamodule"], verbose=False)
            total = time.perf_counter() - start
            threshold = next(iter(module.thresholds.values()))
            rows.append(
                {
                    "rule": rule,
                    "method": method,
                    "backbone": cfg.backbone.model_name,
                    "image_size": image_size,
                    "test": n_test,
                    "calibration": threshold.get("n_normal_images", 0),
                    "calibration_s": sum(spent),
                    "evaluation_s": total - sum(spent),
                }
            )
    return rows + dataset_rows()


def _warm_up(method, image_size: int) -> None:
    """One untimed forward of one image: a process's first pass pays one-off set-up that a full evaluation pays
    once, not once per category (it would otherwise land in the first category's calibration)."""
    import torch

    method.eval()
    method.prepare("object")
    with torch.inference_mode():
        method(torch.randn(1, 3, image_size, image_size), ["object"])


def format_rows(rows: list[dict]) -> str:
    """Timed rows (calibration s / evaluation s), the median share of the repeats, then the image counts on the
    real datasets."""
    lines = []
    timed = [r for r in rows if r.get("rule") == "new" and "calibration_s" in r]
    shares = sorted(r["calibration_s"] / r["evaluation_s"] for r in timed)
    for r in rows:
        if "calibration_s" in r:
            lines.append(
                f"{r['rule']} default, {r['method']} {r['backbone']} RANDOM "
                f"weights {r['image_size']} px: {r['calibration']} calibration vs {r['test']} test images: "
                f"calibration {r['calibration_s']:.1f} s / evaluation {r['evaluation_s']:.1f} s = "
                f"{100 * r['calibration_s'] / r['evaluation_s']:.1f} %"
            )
        else:
            lines.append(
                f"{r['dataset']:<8} {r['rule']} default: {r['calibration']} calibration images on {r['test']} test "
                f"images = +{100 * r['calibration'] / r['test']:.1f} % forward passes"
            )
    if shares:
        lines.append(
            f"new default: median {100 * shares[len(shares) // 2]:.1f} % of the evaluation over {len(shares)} runs "
            f"({100 * shares[0]:.1f}-{100 * shares[-1]:.1f} %); paper-setting experiments: 0 (calibrate: false)"
        )
    return "\n".join(lines)
