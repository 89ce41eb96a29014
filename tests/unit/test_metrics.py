"""Metrics: golden-fixture parity, hand-computed AUPRO, sklearn cross-checks, accumulator and tables."""

import importlib.util
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from parity.reference import fixture_files  # tests/ is on sys.path (rootdir conftest, pytest's prepend mode)
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from vlmad.metrics import (
    METRIC_NAMES,
    AnomalyMetrics,
    aupro,
    aupro_legacy,
    binary_curve_metrics,
    format_markdown,
    format_table,
    label_regions,
    pixel_metrics,
    read_csv,
    summarise,
    write_csv,
)

# The method parity tests' locator ($VLMAD_REFERENCE_FIXTURES, else tests/fixtures): a set folder without metrics/*.pt
# uses the shipped ones (with a warning); no fixtures anywhere fails collection loudly instead of leaving the
# parametrised parity tests silently skipped.
FIXTURE_FILES = fixture_files("metrics")
CASES = ["continuous", "ties"]
# fixture name -> AnomalyMetrics key
ACCUMULATED_KEYS = {
    "image_auroc": "image_auroc",
    "image_ap": "image_ap",
    "image_f1_max": "image_f1max",
    "pixel_auroc": "pixel_auroc",
    "pixel_ap": "pixel_ap",
    "pixel_f1_max": "pixel_f1max",
    "aupro": "pixel_aupro",
    "aupro_legacy_anomalyclip": "pixel_aupro_legacy",
}


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Min-max rescale in float64: the fixture is not in [0, 1] and this keeps the ranking exactly."""
    values = values.double()
    return (values - values.min()) / (values.max() - values.min())


def _fixture_metrics(data: dict, case: str) -> dict[str, float]:
    """Every expected quantity of the fixture, computed by the functions `AnomalyMetrics.compute` uses."""
    maps, scores, masks = data[f"{case}/anomaly_maps"], data[f"{case}/image_scores"], data["masks"]
    image = binary_curve_metrics(_unit(scores), data["labels"])
    pixel = pixel_metrics(maps, masks)  # raw float32 maps, negatives included
    low, high = maps.numpy().min(), maps.numpy().max()
    return {
        **dict(zip(["image_auroc", "image_ap", "image_f1_max"], image, strict=True)),
        "pixel_auroc": pixel["pixel_auroc"],
        "pixel_ap": pixel["pixel_ap"],
        "pixel_f1_max": pixel["pixel_f1max"],
        "aupro": pixel["pixel_aupro"],
        "aupro_fpr_limit_1.0": aupro(maps, masks, fpr_limit=1.0),
        "num_gt_regions_8conn": label_regions(maps, masks, 8)[2],
        "num_gt_regions_4conn": label_regions(maps, masks, 4)[2],
        "aupro_legacy_anomalyclip": aupro_legacy(maps, masks),
        "legacy_num_thresholds": len(np.arange(low, high, (high - low) / 200)),
    }


def _accumulated_metrics(data: dict, case: str) -> dict[str, float]:
    """The same through `AnomalyMetrics` (float32 [0, 1] inputs, batches of 3)."""
    metrics = AnomalyMetrics(legacy_aupro=True)
    maps, scores = _unit(data[f"{case}/anomaly_maps"]).float(), _unit(data[f"{case}/image_scores"]).float()
    for start in range(0, len(scores), 3):
        batch = slice(start, start + 3)
        metrics.update(scores[batch], data["labels"][batch], maps[batch], data["masks"][batch])
    return metrics.compute()


def test_fixtures_present():
    assert FIXTURE_FILES, "no metric fixtures"


def test_a_set_without_metric_fixtures_uses_the_shipped_ones_and_none_anywhere_fails(tmp_path, monkeypatch):
    import parity.reference

    (tmp_path / "musc").mkdir()  # a fixture set folder (e.g. the full-size MuSc set), but without metrics/
    monkeypatch.setenv("VLMAD_REFERENCE_FIXTURES", str(tmp_path))
    spec = importlib.util.spec_from_file_location("test_metrics_elsewhere", __file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.warns(UserWarning, match=re.escape(f"using the shipped {parity.reference.SHIPPED / 'metrics'}")):
        spec.loader.exec_module(module)  # what collecting this file does
    assert module.FIXTURE_FILES and all(p.parent == parity.reference.SHIPPED / "metrics" for p in module.FIXTURE_FILES)
    monkeypatch.setattr(parity.reference, "SHIPPED", tmp_path / "nothing shipped")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no *.pt fixtures in {tmp_path / 'metrics'}")):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_parity_with_golden_fixture(path, case):
    data = _load(path)
    prefix = f"{case}/expected/"
    expected = {k[len(prefix) :]: v.item() for k, v in data.items() if k.startswith(prefix)}
    assert expected
    ours = _fixture_metrics(data, case)
    assert set(expected) <= set(ours), f"unhandled expected keys {set(expected) - set(ours)}"
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name  # legacy AUPRO too: measured |Δ| = 0
    # Official AUPRO is float64 end to end: far tighter than the 1e-4 asked.
    assert ours["aupro"] == pytest.approx(expected["aupro"], abs=1e-9)
    # End to end through the accumulator (float32 storage, batches of 3).
    accumulated = _accumulated_metrics(data, case)
    for name, key in ACCUMULATED_KEYS.items():
        assert accumulated[key] == pytest.approx(expected[name], abs=1e-6), key


@pytest.mark.parity
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_diagnostics_show_common_mistakes(path, case):
    data = _load(path)
    maps, masks, labels = data[f"{case}/anomaly_maps"], data["masks"], data["labels"]
    checks = data["meta"][f"{case}_cross_checks"]
    official = aupro(maps, masks)
    four = aupro(maps, masks, connectivity=4)
    anomalous_only = aupro(maps[labels == 1], masks[labels == 1])
    assert four == pytest.approx(checks["diagnostic_aupro_with_4_connectivity"], abs=1e-6)
    assert anomalous_only == pytest.approx(checks["diagnostic_aupro_fpr_over_anomalous_images_only"], abs=1e-6)
    assert abs(four - official) > 1e-2
    assert abs(anomalous_only - official) > 1e-4
    assert official == pytest.approx(checks["mvtec_ad_2d_algorithm"], abs=1e-7)


# ---------------------------------------------------------------- AUPRO by hand and by brute force


def test_aupro_hand_cases():
    mask = np.array([[[1, 0], [0, 0]]])
    # Region pixel 0.5, normals 0.9 / 0.2 / 0.1: curve (0,0) (1/3,0) (1/3,1) (2/3,1) (1,1).
    single = np.array([[[0.5, 0.9], [0.2, 0.1]]], dtype=np.float32)
    assert aupro(single, mask) == pytest.approx(0.0)
    assert aupro(single, mask, fpr_limit=0.5) == pytest.approx((0.5 - 1 / 3) / 0.5)
    assert aupro(single, mask, fpr_limit=1.0) == pytest.approx(2 / 3)
    # Two images, the second defect-free: its pixels count in the FPR. Curve (0,.5) (1/6,.5) (2/6,.5) (3/6,.5)
    # (3/6,1) ... -> 0.5 on [0, 0.3] and 0.5 * 0.5 + 0.5 on [0, 1].
    maps = np.array([[[0.8, 0.4], [0.2, 0.6]], [[0.1, 0.3], [0.5, 0.7]]], dtype=np.float32)
    masks = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    assert aupro(maps, masks) == pytest.approx(0.5)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[1, 8:12, 9:10] = 1
    noise = rng.uniform(0, 0.2, masks.shape)
    assert aupro(masks + noise * (masks == 0), masks) == pytest.approx(1.0)  # tied defects above all normals
    assert aupro(1.0 - masks, masks) == 0.0  # every normal pixel ranked above every defect
    assert aupro(1.0 - masks, masks, fpr_limit=1.0) == pytest.approx(0.0)


def _naive_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Literal MVTec definition: one PRO/FPR evaluation per distinct threshold."""
    labels = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, r) for i, lab in enumerate(labels) for r in range(1, lab.max() + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        positive = maps >= t
        pro = np.mean([positive[i][labels[i] == r].mean() for i, r in regions])
        points.append(((positive & normal).sum() / normal.sum(), pro))
    points.append((1.0, 1.0))
    x, y = map(np.array, zip(*points, strict=True))
    ins = np.searchsorted(x, fpr_limit, side="right")
    y_lim = np.interp(fpr_limit, x[ins - 1 : ins + 1], y[ins - 1 : ins + 1])
    x = np.append(x[:ins], fpr_limit)
    y = np.append(y[:ins], y_lim)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def _naive_legacy(maps: np.ndarray, masks: np.ndarray) -> float:
    """`cal_pro_score` of AnomalyCLIP / APRIL-GAN, relabelling at each threshold as the original does."""
    maps = maps.astype(np.float32)
    low, high = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(low, high, (high - low) / 200):
        binary = maps > th
        pro = []
        for b, m in zip(binary, masks, strict=True):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            pro += [b[lab == r].sum() / (lab == r).sum() for r in range(1, n + 1)]
        pros.append(np.mean(pro))
        fprs.append(np.logical_and(masks == 0, binary).sum() / (masks == 0).sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < 0.3
    fprs = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return float(-np.trapezoid(pros[keep], fprs))


@pytest.mark.parametrize("quantise", [False, True])
def test_aupro_matches_brute_force(quantise):
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 20, 20), dtype=np.uint8)
    masks[0, 3:8, 3:9] = 1
    masks[0, 12:14, 12:18] = 1
    masks[1, np.arange(5, 15), np.arange(5, 15)] = 1  # diagonal: one region only with 8-connectivity
    masks[2, 0:2, 0:2] = masks[2, 2:4, 2:4] = 1  # corner-touching squares
    maps = (rng.uniform(0, 0.6, masks.shape) + 0.4 * masks * rng.uniform(0, 1, masks.shape)).astype(np.float32)
    if quantise:
        maps = np.round(maps * 16) / 16
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_naive_aupro(maps, masks, limit), abs=1e-10)
    assert aupro_legacy(maps, masks) == pytest.approx(_naive_legacy(maps, masks), abs=1e-12)


@pytest.mark.parametrize("quantise", [False, True])
def test_pixel_metrics_match_sklearn_torchmetrics_and_float64_path(quantise):
    rng = np.random.default_rng(5)
    masks = (rng.uniform(0, 1, (3, 30, 30)) > 0.9).astype(np.uint8)
    maps = (rng.normal(0, 1, masks.shape) + masks).astype(np.float32)  # negatives exercise the bit trick
    maps[0, 0, :4] = [-0.0, 0.0, -0.0, 0.0]  # signed zeros must tie
    if quantise:
        maps = np.round(maps * 4) / 4
    fast = pixel_metrics(maps, masks)
    slow = pixel_metrics(maps.astype(np.float64), masks)  # argsort path
    assert fast == pytest.approx(slow, abs=1e-12)
    target, flat = masks.ravel(), maps.ravel()
    assert fast["pixel_auroc"] == pytest.approx(roc_auc_score(target, flat), abs=1e-12)
    assert fast["pixel_ap"] == pytest.approx(average_precision_score(target, flat), abs=1e-12)
    unit = torch.from_numpy(flat.astype(np.float64))
    unit = (unit - unit.min()) / (unit.max() - unit.min())
    auroc, ap, f1 = binary_curve_metrics(unit, torch.from_numpy(target))
    assert fast["pixel_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert fast["pixel_ap"] == pytest.approx(ap, abs=1e-12)
    assert fast["pixel_f1max"] == pytest.approx(f1, abs=1e-12)
    assert fast["pixel_aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)


def test_aupro_accepts_lists_of_differently_sized_maps():
    rng = np.random.default_rng(2)
    masks = [np.zeros((12, 20), np.uint8), np.zeros((16, 16), np.uint8)]
    masks[0][2:6, 3:9] = 1
    maps = [rng.uniform(0, 1, m.shape).astype(np.float32) + m for m in masks]
    maps = [m / 2 for m in maps]
    # Pooling is order-independent, so it equals the padded-free per-pixel brute force on each layout.
    stacked = aupro([maps[0][None], maps[1][None]], [masks[0][None], masks[1][None]])
    assert stacked == pytest.approx(aupro(maps, masks))
    assert 0.0 <= stacked <= 1.0


def test_aupro_undefined_is_nan_with_warning():
    with pytest.warns(UserWarning, match="AUPRO undefined"):
        assert math.isnan(aupro(np.random.rand(2, 8, 8), np.zeros((2, 8, 8))))
    with pytest.warns(UserWarning, match="undefined"):
        assert math.isnan(aupro_legacy(np.random.rand(2, 8, 8), np.zeros((2, 8, 8))))


# ---------------------------------------------------------------- AnomalyMetrics


def _synthetic_category(seed: int, n: int = 12, size: int = 24):
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 3 != 0).long()
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in torch.nonzero(labels).flatten().tolist():
        y, x = torch.randint(0, size - 6, (2,), generator=gen).tolist()
        masks[i, y : y + 5, x : x + 4] = 1
    maps = 0.6 * torch.rand(n, size, size, generator=gen) + 0.4 * masks * torch.rand(n, size, size, generator=gen)
    maps = torch.round(maps * 64) / 64  # ties
    scores = (0.5 * labels + 0.6 * torch.rand(n, generator=gen)).clamp(0, 1)
    scores = torch.round(scores * 8) / 8
    return scores, labels, maps, masks


def _run(metrics: AnomalyMetrics, data, batch: int = 5) -> dict[str, float]:
    scores, labels, maps, masks = data
    for s in range(0, len(scores), batch):
        metrics.update(scores[s : s + batch], labels[s : s + batch], maps[s : s + batch], masks[s : s + batch])
    return metrics.compute()


def test_metric_keys():
    assert list(_run(AnomalyMetrics(), _synthetic_category(0))) == METRIC_NAMES
    assert list(_run(AnomalyMetrics(legacy_aupro=True), _synthetic_category(0))) == [
        *METRIC_NAMES,
        "pixel_aupro_legacy",
    ]


def test_matches_sklearn():
    data = _synthetic_category(3)
    scores, labels, maps, masks = (t.numpy() for t in data)
    out = _run(AnomalyMetrics(), data)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    assert out["pixel_f1max"] == pytest.approx(np.nanmax(f1), abs=1e-9)


def test_legacy_mode_fills_pixel_aupro():
    data = _synthetic_category(4)
    official = _run(AnomalyMetrics(legacy_aupro=True), data)
    legacy = _run(AnomalyMetrics(aupro_mode="legacy"), data)
    assert legacy["pixel_aupro"] == pytest.approx(official["pixel_aupro_legacy"])
    assert legacy["pixel_aupro"] != pytest.approx(official["pixel_aupro"])
    with pytest.raises(ValueError, match="aupro_mode"):
        AnomalyMetrics(aupro_mode="mvtec")


def _state_bytes(metrics: AnomalyMetrics) -> int:
    state = metrics._scores + metrics._labels + metrics._maps + metrics._masks
    return sum(t.numel() * t.element_size() for t in state)


def test_per_category_flush_is_independent_and_bounded():
    first, second = _synthetic_category(5), _synthetic_category(6, n=9)
    metrics = AnomalyMetrics()
    out_first = _run(metrics, first)
    bytes_first = _state_bytes(metrics)
    metrics.reset()
    assert _state_bytes(metrics) == 0
    out_second = _run(metrics, second)
    assert _state_bytes(metrics) < bytes_first  # only the second (smaller) category is held
    assert out_second == _run(AnomalyMetrics(), second)
    assert out_first == _run(AnomalyMetrics(), first)
    assert out_first != out_second


def test_single_class_category_gives_nan_image_metrics():
    scores, labels, maps, masks = _synthetic_category(7)
    normal = labels == 0
    metrics = AnomalyMetrics()
    metrics.update(scores[normal], labels[normal], maps[normal], masks[normal])
    with pytest.warns(UserWarning) as record:
        out = metrics.compute()
    messages = " ".join(str(w.message) for w in record)
    assert "image metrics undefined" in messages and "pixel metrics undefined" in messages
    assert all(math.isnan(v) for v in out.values())


def test_images_without_mask_only_count_for_image_metrics():
    scores, labels, maps, masks = _synthetic_category(8)
    extra_score, extra_label = torch.tensor([0.9]), torch.tensor([1])
    extra_map, extra_mask = torch.full((1, 24, 24), 0.99), torch.zeros(1, 24, 24, dtype=torch.uint8)
    base = _run(AnomalyMetrics(), (scores, labels, maps, masks))
    metrics = AnomalyMetrics()
    metrics.update(scores, labels, maps, masks, has_mask=torch.ones(len(scores), dtype=torch.bool))
    metrics.update(extra_score, extra_label, extra_map, extra_mask, has_mask=torch.tensor([False]))
    out = metrics.compute()
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert out[name] == base[name]
    assert out["image_auroc"] != base["image_auroc"]


@pytest.mark.parametrize(
    ("score", "amap"),
    [(1.5, 0.5), (-0.1, 0.5), (float("nan"), 0.5), (0.5, 2.0), (0.5, float("inf"))],
)
def test_out_of_range_inputs_raise(score, amap):
    with pytest.raises(ValueError, match="sigmoid"):
        AnomalyMetrics().update(
            torch.tensor([score]), torch.tensor([1]), torch.full((1, 4, 4), amap), torch.ones(1, 4, 4)
        )


def test_exact_matches_binned_on_unit_interval():
    gen = torch.Generator().manual_seed(9)
    target = torch.randint(0, 2, (3000,), generator=gen)
    preds = (0.3 * target + 0.7 * torch.rand(3000, generator=gen)).clamp(0, 1)
    out = AnomalyMetrics(compute_pixel=False)
    out.update(preds, target)
    exact = out.compute()["image_auroc"]
    assert exact == pytest.approx(binary_auroc(preds, target, thresholds=10_001).item(), abs=1e-3)


# ---------------------------------------------------------------- tables


ROWS = {
    "bottle": {name: 0.5 for name in METRIC_NAMES} | {"pixel_aupro_legacy": 0.25},
    "cable": {name: 0.9 for name in METRIC_NAMES} | {"image_auroc": math.nan, "pixel_aupro_legacy": 0.75},
}


def test_summarise_nanmean():
    rows = summarise(ROWS)
    assert list(rows) == ["bottle", "cable", "mean"]
    assert rows["mean"]["image_auroc"] == pytest.approx(0.5)  # NaN excluded
    assert rows["mean"]["image_ap"] == pytest.approx(0.7)
    assert rows["mean"]["pixel_aupro_legacy"] == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(summarise({"a": {"image_auroc": math.nan}})["mean"]["image_auroc"])


def test_csv_exact_and_round_trip(tmp_path):
    rows = summarise(ROWS)
    path = tmp_path / "run" / "metrics.csv"
    write_csv(path, rows)
    lines = path.read_text().splitlines()
    counts = ",n_categories_image,n_categories_pixel"
    assert lines[0] == "category," + ",".join(METRIC_NAMES) + ",pixel_aupro_legacy" + counts
    assert lines[1] == "bottle," + ",".join(["0.5"] * 7) + ",0.25,1,1"
    assert lines[2] == "cable,nan," + ",".join(["0.9"] * 6) + ",0.75,1,1"
    assert lines[3].startswith("mean,0.5,0.7,") and lines[3].endswith(",2,2")
    assert len(lines) == 4
    back = read_csv(path)
    assert list(back) == list(rows)
    for category, values in rows.items():
        assert list(back[category]) == [*METRIC_NAMES, "pixel_aupro_legacy"]
        for name, value in values.items():
            assert back[category][name] == value or (math.isnan(value) and math.isnan(back[category][name]))
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temp file left


def test_format_table_percent_one_decimal():
    text = format_table(summarise(ROWS), title="MVTec-AD")
    lines = text.splitlines()
    assert lines[0] == "MVTec-AD"
    assert lines[1].split() == ["category", *METRIC_NAMES, "pixel_aupro_legacy"]
    assert lines[3].split() == ["bottle", *["50.0"] * 7, "25.0"]
    assert lines[4].split() == ["cable", "n/a", *["90.0"] * 6, "75.0"]
    assert set(lines[5]) == {"-"}
    assert lines[6].split()[:3] == ["mean", "50.0", "70.0"]
    markdown = format_markdown(summarise(ROWS)).splitlines()
    assert markdown[0].startswith("| category | image_auroc |")
    assert markdown[-1].startswith("| **mean** | 50.0 | 70.0 |")


# ---------------------------------------------------------------- undefined metrics and bad tables (issue 7)


def test_undefined_metric_warning_names_the_category():
    from vlmad.metrics.anomaly_metrics import UndefinedMetricWarning

    scores, labels, maps, masks = _synthetic_category(9)
    metrics = AnomalyMetrics()
    defective = labels == 1
    metrics.update(scores[defective], labels[defective], maps[defective], masks[defective])
    with pytest.warns(UndefinedMetricWarning) as record:
        out = metrics.compute(category="screw")
    assert [str(w.message) for w in record] == [
        f"image metrics undefined for category 'screw': all {int(defective.sum())} images are defective; "
        "the category is left out of the image-metric mean"
    ]
    assert math.isnan(out["image_auroc"]) and not math.isnan(out["pixel_auroc"])


def test_mean_row_says_how_many_categories_it_averages(tmp_path):
    from vlmad.metrics.anomaly_metrics import UndefinedMetricWarning

    rows = {
        "bottle": dict.fromkeys(METRIC_NAMES, 0.5),
        "screw": dict.fromkeys(METRIC_NAMES, 0.7)
        | {"image_auroc": math.nan, "image_ap": math.nan, "image_f1max": math.nan},
        "zipper": dict.fromkeys(METRIC_NAMES, 0.9),
    }
    with pytest.warns(UndefinedMetricWarning, match=r"image metrics over 2 of 3 categories \(.* undefined for screw\)"):
        table = summarise(rows)
    assert table["mean"]["image_auroc"] == pytest.approx(0.7) and table["mean"]["pixel_auroc"] == pytest.approx(0.7)
    write_csv(tmp_path / "metrics.csv", table)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("category," + ",".join(METRIC_NAMES) + ",")  # existing columns first, in order
    assert lines[0].endswith(",n_categories_image,n_categories_pixel")
    assert lines[2].endswith(",0,1") and lines[4].startswith("mean,") and lines[4].endswith(",2,3")
    as_text = lambda t: {c: {k: repr(v) for k, v in row.items()} for c, row in t.items()}  # noqa: E731 (NaN != NaN)
    assert as_text(read_csv(tmp_path / "metrics.csv")) == as_text(table)  # derived counts are not read back
    text = format_table(table)
    assert text.splitlines()[-1] == "mean of image metrics over 2 of 3 categories (image metrics undefined for screw)"
    assert format_markdown(table).splitlines()[-1] == text.splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            np.random.default_rng(0).bytes(3000),
            r"metrics\.csv: not a UTF-8 text CSV \(byte 0x[0-9a-f]{2} at offset \d+\)",
        ),
        (
            'category,image_auroc\nbottle,0.5\nscrew,"0.7\nzipper,0.9\n' + "x," * 500,
            r"metrics\.csv line 3: unbalanced quote",
        ),
        (
            "category,image_auroc\nbottle,0.5\nscrew,high\n",
            r"metrics\.csv line 3: image_auroc = 'high' is not a number",
        ),
        ("category,image_auroc\nbottle,0.5,0.7\n", r"metrics\.csv line 2: 3 fields, the header has 2"),
        ("name," + "x" * 3000 + "\n", r"metrics\.csv line 1: not a metrics table \(header 'name,xxx"),
    ],
)
def test_bad_metrics_csv_is_one_short_line(tmp_path, content, message):
    from vlmad.data import DataError

    path = tmp_path / "metrics.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as info:
        read_csv(path)
    assert len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 200 + len(str(path))


def test_report_lists_a_run_with_an_unreadable_metrics_csv_as_failed(tmp_path):
    from vlmad.outputs.report import collect

    good, bad = tmp_path / "good", tmp_path / "bad"
    for run_dir in (good, bad):
        run_dir.mkdir()
        (run_dir / "run.json").write_text('{"status": "done", "overrides": []}')
    write_csv(good / "metrics.csv", summarise({"bottle": dict.fromkeys(METRIC_NAMES, 0.5)}))
    (bad / "metrics.csv").write_bytes(np.random.default_rng(1).bytes(3000))
    done, failed = collect(tmp_path)
    assert [r["dir"] for r in done] == ["good"] and done[0]["rows"]["mean"]["image_auroc"] == 0.5
    assert [r["dir"] for r in failed] == ["bad"]
    assert (
        failed[0]["reason"].startswith("done: unreadable metrics.csv: ")
        and "not a UTF-8 text CSV" in failed[0]["reason"]
    )
