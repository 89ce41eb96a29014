"""Visualisation helpers: shapes, dtypes, ranges, PNG round trip, labelled panels, panel choice, report curves."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlmad.outputs.heatmaps import (
    PANEL_BAR,
    PANEL_GAP,
    PANEL_REASONS,
    colorize,
    colour_scale,
    denormalize_image,
    display_size,
    keep_set,
    normalize_map,
    overlay_panel,
    render_panel,
    resize_array,
    save_png,
    select_panels,
)
from vlmad.outputs.html import roc_pr_points, svg_plot
from vlmad.outputs.predictions import CategoryOutputs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_normalize_map_range():
    amap = torch.linspace(-2, 3, 64).reshape(8, 8)
    out = normalize_map(amap)
    assert out.shape == (8, 8) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    fixed = normalize_map(np.full((4, 4), 0.25), vmin=0.0, vmax=1.0)
    assert np.allclose(fixed, 0.25)
    assert np.all(normalize_map(np.ones((3, 3))) == 0)  # constant map, no division by zero


def test_denormalize_image_inverts_clip_transform():
    rgb = torch.rand(3, 10, 12)
    normalised = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    out = denormalize_image(normalised, CLIP_MEAN, CLIP_STD)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.round(rgb.permute(1, 2, 0).numpy() * 255)).max() <= 1


def test_colorize_is_jet_like():
    out = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    low, mid, high = out[0].astype(int)
    assert low[2] > 100 and low[0] == 0  # dark blue
    assert mid[1] > 200  # green-ish middle
    assert high[0] > 100 and high[2] == 0  # dark red


@pytest.mark.parametrize("with_mask", [True, False])
def test_overlay_panel(with_mask):
    image = np.full((16, 20, 3), 128, dtype=np.uint8)
    amap = np.zeros((16, 20), dtype=np.float32)
    amap[4:8, 4:8] = 1.0
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[4:10, 4:10] = 1
    panel = overlay_panel(image, amap, mask if with_mask else None, alpha=0.5)
    assert panel.shape == (16, 60, 3) and panel.dtype == np.uint8
    assert np.array_equal(panel[:, :20], image)
    assert not np.array_equal(panel[:, 20:40], image)  # heatmap blended
    truth = panel[:, 40:]
    if with_mask:
        assert tuple(truth[4, 4]) == (255, 0, 0)  # outline
        assert np.array_equal(truth[0, 0], image[0, 0])  # outside the mask untouched
    else:
        assert np.array_equal(truth, image)
    with pytest.raises(ValueError, match="same size"):
        overlay_panel(image, np.zeros((8, 8)), None)


def test_save_png_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "panel.png"
    save_png(path, array)
    assert np.array_equal(np.asarray(Image.open(path)), array)


# ------------------------------------------------------------------ labelled panels, panel choice, report helpers


def test_render_panel_keeps_a_non_square_aspect_and_draws_a_colour_bar():
    height, width = display_size((300, 500))
    assert (height, width) == (154, 256)
    image = resize_array(np.full((64, 64, 3), 128, np.uint8), (height, width), "image")
    amap = np.tile(np.linspace(0.2, 0.6, width, dtype=np.float32), (height, 1))
    gt = np.zeros((height, width), bool)
    gt[20:60, 30:90] = True
    panel = render_panel(image, amap, gt, (0.2, 0.6), ["line one", "line two"], "note", pixel_threshold=0.5)
    assert panel.shape[1] == 4 * width + 3 * PANEL_GAP + PANEL_BAR and panel.shape[0] > height
    bar = panel[-height:, 4 * (width + PANEL_GAP) : 4 * (width + PANEL_GAP) + 16]
    assert bar[0, 8, 0] > 100 and bar[0, 8, 2] == 0 and bar[-1, 8, 2] > 100  # red at the top, blue at the bottom
    heat = panel[-height:, width + PANEL_GAP : 2 * width + PANEL_GAP]
    assert heat[80, 5, 2] > heat[80, -5, 2]  # low values (left) bluer than high ones: one fixed scale
    pred = panel[-height:, 3 * (width + PANEL_GAP) : 4 * width + 3 * PANEL_GAP]
    assert not np.array_equal(pred[:, -10:], image[:, -10:]) and np.array_equal(pred[:, :5], image[:, :5])
    with pytest.raises(ValueError, match="same size"):
        render_panel(image, amap[:10], None, (0, 1), [], "note")


def test_colour_scale_is_robust_to_outliers():
    values = np.r_[np.linspace(0.4, 0.5, 1000), 1.0]
    low, high = colour_scale(values)
    assert 0.4 <= low < high <= 0.5
    assert colour_scale(np.full(10, 0.3))[1] > 0.3  # constant maps still get a range


def test_select_panels_worst_fp_fn_and_every_defect_type():
    scores = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.6]
    labels = [0, 0, 1, 1, 1, 0, 1]
    types = ["good", "good", "crack", "hole", "crack", "good", "cut"]
    picks = select_panels(scores, labels, types, 6, threshold=0.55)
    assert picks[:2] == [(1, "fp"), (3, "fn")]  # the highest normal, the lowest defective
    assert {types[i] for i, _ in picks} == {"good", "crack", "hole", "cut"}
    assert (4, "top") in picks and (6, "top") in picks  # the best crack, the only cut
    assert len(picks) == len({i for i, _ in picks}) == 6
    reasons = [r for _, r in picks]  # each panel's reason is its own: only one "highest" / "lowest" of each
    assert reasons.count("fp") + reasons.count("normal") == 1 and reasons.count("fn") + reasons.count("defect") == 1
    assert (5, "normal_more") in picks and (2, "fn_more") in picks  # 0.2 < 0.55: normal; 0.5 <= 0.55: missed
    assert all(r in PANEL_REASONS for r in reasons)
    assert select_panels(scores, labels, types, 2, threshold=0.95)[:2] == [(1, "normal"), (3, "fn")]
    assert [i for i, _ in select_panels(scores, labels, types, None)] == list(range(7))


def test_category_outputs_keep_only_bounded_candidate_maps():
    rng = np.random.default_rng(0)
    outputs = CategoryOutputs("cat", num_panels=3)
    scores, labels, types = [], [], []
    for _ in range(10):  # batches of 4 in loader order
        batch_scores = rng.random(4)
        batch = {
            "path": [f"/x/{len(scores) + i}.png" for i in range(4)],
            "label": torch.tensor(rng.integers(0, 2, 4)),
            "defect_type": [rng.choice(["a", "b"]) for _ in range(4)],
            "has_mask": torch.ones(4, dtype=bool),
        }
        batch["defect_type"] = [
            t if y else "good" for t, y in zip(batch["defect_type"], batch["label"].tolist(), strict=True)
        ]
        outputs.add(batch, torch.tensor(batch_scores), torch.rand(4, 8, 8))
        scores += batch_scores.tolist()
        labels += batch["label"].tolist()
        types += batch["defect_type"]
        assert len(outputs.maps) <= len(keep_set(scores, labels, types, 3)) <= 3 + 3 + 2
    assert {i for i, _ in select_panels(scores, labels, types, 3)} <= set(outputs.maps)  # never dropped too early
    rows = outputs.finish({"image_threshold": 0.5, "pixel_threshold": 0.7, "source": "test"})
    assert [r["decision"] for r in rows] == ["NG" if s > 0.5 else "OK" for s in scores]


def test_roc_pr_points_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50) + 0.3 * labels, 1)  # ties
    fpr, tpr, precision = roc_pr_points(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores))
    assert np.sum(np.diff(np.r_[0.0, tpr[1:]]) * precision) == pytest.approx(average_precision_score(labels, scores))
    svg = svg_plot([("ROC", fpr, tpr)], "t", "FPR", "TPR", diagonal=True)
    assert svg.startswith("<svg") and "<polyline" in svg and "http" not in svg


def test_predictions_csv_has_absolute_paths_and_no_negative_zero(tmp_path, monkeypatch):
    from vlmad.metrics.table import percent, write_csv
    from vlmad.outputs.predictions import write_predictions

    monkeypatch.chdir(tmp_path)
    outputs = CategoryOutputs("cat", num_panels=1)
    batch = {
        "path": ["data/cat/a.png", "data/cat/b.png|data/cat/c.png"],  # a relative root; a mosaic of two tiles
        "label": torch.tensor([0, 1]),
        "defect_type": ["good", "hole"],
        "has_mask": torch.ones(2, dtype=bool),
    }
    outputs.add(batch, torch.tensor([-0.0, 0.5]), torch.full((2, 4, 4), -0.0))
    rows = outputs.finish({"image_threshold": None, "pixel_threshold": None, "source": "none"})
    assert rows[0]["path"] == str(tmp_path / "data/cat/a.png")
    assert rows[1]["path"] == f"{tmp_path / 'data/cat/b.png'}|{tmp_path / 'data/cat/c.png'}"
    write_predictions(tmp_path / "predictions.csv", rows)
    write_csv(tmp_path / "metrics.csv", {"cat": {"image_auroc": -0.0, "pixel_aupro_legacy": -0.0}})
    for name in ("predictions.csv", "metrics.csv"):
        assert "-0.0" not in (tmp_path / name).read_text()
    assert percent(-1e-9) == "0.0" and percent(0.5, -1e-9) == "50.0 ± 0.0"


def test_report_captions_name_each_panels_own_reason():
    from vlmad.outputs.html import panel_caption

    assert panel_caption("04_fp_more_good_004.png") == f"{PANEL_REASONS['fp_more']}: 04_fp_more_good_004.png"
    assert panel_caption("00_fp_good_000.png").startswith("false positive (highest-scoring normal image): ")
    assert panel_caption("02_top_blob_001.png").startswith(PANEL_REASONS["top"])
    assert panel_caption("custom.png") == "custom.png"


def test_sweep_report_fits_a_window_banners_once_member_labels_integer_k(tmp_path, capsys):
    import re

    from vlmad.metrics.table import write_csv
    from vlmad.outputs.report import main as report_main
    from vlmad.outputs.report import write_run_json

    base = {"status": "done", "eval_set": "MVTec", "backbone": "tiny", "pretrained": None, "seed": 0}
    base |= {"eval_categories": ["bottle"], "fit_root": "/abs/data/visa", "eval_root": "/abs/data/mvtec"}
    metrics = {"image_auroc": 0.9, "pixel_auroc": 0.8}
    for k in (0, 1, 2, 4, 10):  # a k-shot sweep on one member
        job = tmp_path / "cmp" / f"k{k}"
        write_csv(job / "metrics.csv", {"bottle": metrics, "mean": metrics})
        write_run_json(job, {**base, "method": "WinCLIP", "member": "WinCLIP few-shot", "k_shot": k, "overrides": []})
    job = tmp_path / "cmp" / "april"  # an evaluate-only member: no fit root
    write_csv(job / "metrics.csv", {"bottle": metrics, "mean": metrics})
    write_run_json(job, {**base, "method": "AprilGAN", "member": "APRIL-GAN", "k_shot": 0, "fit_root": None})
    report_main([str(tmp_path / "cmp")])
    capsys.readouterr()
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("RANDOM WEIGHTS") == 1 and page.count("SUBSET OF CATEGORIES") == 1  # banners once
    assert "<th>flags</th>" not in page and "<th>member</th>" in page and "<td>APRIL-GAN</td>" in page
    assert "<td>/abs/data/visa</td>" not in page and 'title="/abs/data/visa">visa</span>' in page  # not absolute
    assert "[None]" not in page and "[random weights]" in page
    ticks = re.findall(r'text-anchor="middle">([\d.]+)</text>', page.split("k-shot curve</text>")[1].split("</svg>")[0])
    assert ticks == ["0", "1", "2", "4", "10"]  # integer k ticks, the values run
