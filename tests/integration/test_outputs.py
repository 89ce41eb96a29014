"""What a user looks at after a run: predictions.csv, thresholds.json, heatmap panels and report.html."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testlib import SYNTHETIC, SYNTHETIC_CATEGORIES

from vlmad.config import compose
from vlmad.engine.run import evaluate
from vlmad.outputs.heatmaps import PANEL_BAR, PANEL_GAP, display_size
from vlmad.outputs.predictions import PREDICTION_COLUMNS
from vlmad.outputs.report import main as report_main


def _predictions(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == PREDICTION_COLUMNS
        return list(reader)


def _panels(out: Path, category: str) -> list[Path]:
    return sorted((out / "heatmaps" / category).glob("*.png"))


def _check_report(out: Path, categories: list[str]) -> str:
    text = (out / "report.html").read_text()
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", text, flags=re.I)  # opens offline
    assert "http" not in " ".join(re.findall(r"""(?:src|href)="([^"]*)\"""", text))
    assert "<script" not in text
    for category in categories:
        assert f"<td>{category}</td>" in text  # a table row
        assert re.search(rf'<div id="curves-{category}"><svg', text)  # ROC + PR curves
        assert text.count('alt="') >= 1
    return text


def test_run_outputs_and_sweep_report(make_cfg, tmp_path, capsys):
    """k=1 and k=0 WinCLIP runs of one sweep: per-image rows, train-only thresholds, chosen panels, both reports."""
    root = tmp_path / "sweep"
    runs = {}
    for k in (1, 0):
        # every normal training image but the reference (no share cap: the tiny set has 4 test images)
        extra = ["module.threshold.max_share=null"]
        cfg = make_cfg("evaluate", "method=winclip", f"method.k_shot={k}", "module.num_overlays=4", *extra)
        cfg.paths.output_dir = str(root / f"k{k}")
        runs[k] = evaluate(cfg)[1]
    out, dm = root / "k1", runs[1]["datamodule"]
    categories = dm.test_categories
    rows = _predictions(out)
    thresholds = json.loads((out / "thresholds.json").read_text())
    for category in categories:
        records = dm.test_set.records(category, "test")
        mine = [r for r in rows if r["category"] == category]
        assert [r["path"] for r in mine] == [str(r.image) for r in records]  # one row per test image, loader order
        assert [int(r["label"]) for r in mine] == [r.label for r in records]
        assert [r["defect_type"] for r in mine] == [r.defect_type for r in records]
        # thresholds: normal TRAINING images only, the few-shot reference left out
        t = thresholds[category]
        references = (out / "references" / f"{category}_k1_seed0.txt").read_text().split()
        train_good = {str(r.image) for r in dm.test_set.records(category, "train") if r.label == 0}
        assert set(t["images"]) == train_good - set(references) and len(t["images"]) == SYNTHETIC["n_train"] - 1
        assert t["n_normal_images"] == len(t["images"]) and "train/good" in t["source"]
        for r in mine:
            assert float(r["image_threshold"]) == pytest.approx(t["image_threshold"])
            assert r["decision"] == ("NG" if float(r["image_score"]) > t["image_threshold"] else "OK")
            assert 0.0 <= float(r["image_score"]) <= 1.0 and float(r["max_pixel_score"]) <= 1.0
        # panels: the worst FP (highest normal) first, the worst FN (lowest defective) second, every defect type
        panels = [p.name for p in _panels(out, category)]
        normal = max((r for r in mine if r["label"] == "0"), key=lambda r: float(r["image_score"]))
        defective = min((r for r in mine if r["label"] == "1"), key=lambda r: float(r["image_score"]))
        assert panels[0].startswith(("00_fp_good_", "00_normal_good_")) and Path(normal["path"]).stem in panels[0]
        assert panels[1].startswith(("01_fn_", "01_defect_")) and Path(defective["path"]).stem in panels[1]
        shown = {r["defect_type"] for r in mine if any(Path(r["path"]).stem in p for p in panels)}
        assert shown == {r.defect_type for r in records}
    text = _check_report(out, categories)
    assert "RANDOM WEIGHTS" in text and "Thresholds" in text
    report_main([str(root)])
    sweep = (root / "report.html").read_text()
    assert " ± " in sweep and "k-shot curve" in sweep and "<svg" in sweep and "(k_shot does not vary)" not in sweep
    assert "RANDOM WEIGHTS" in sweep and 'href="k1/report.html"' in sweep
    assert "http" not in " ".join(re.findall(r"""(?:src|href)="([^"]*)\"""", sweep))


def test_visa_panels_keep_aspect_and_save_all_without_calibration(synthetic_roots, tmp_path, count_encodes):
    """Non-square JPEGs: panels at the image's aspect ratio; calibrate=false costs no extra pass; save all."""
    from vlmad.methods.winclip import WinCLIP

    calls = count_encodes(WinCLIP)
    cats = ",".join(SYNTHETIC_CATEGORIES["visa"])
    data = [
        f"data.root={synthetic_roots['visa']}",
        f"data.categories=[{cats}]",
        *(f"data.{k}={v}" for k, v in SYNTHETIC.items()),
    ]
    cfg = compose(
        "evaluate",
        [
            "backbone=tiny",
            "backbone.image_size=64",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "datamodule.batch_size=4",
            "datamodule.num_workers=0",
            "method=winclip",
            "data=synthetic_visa",
            *data,
            "module.threshold.calibrate=false",
            "module.save_all_overlays=true",
        ],
        tmp_path / "run",
    )
    _, objects = evaluate(cfg)
    out, dm = Path(cfg.paths.output_dir), objects["datamodule"]
    rows = _predictions(out)
    assert sum(calls) == len(rows)  # the test images only: no calibration forward passes
    assert {r["decision"] for r in rows} == {"n/a"} and {r["image_threshold"] for r in rows} == {""}
    assert {r["threshold_source"] for r in rows} == {"none (module.threshold.calibrate=false)"}
    heights = set()
    for category in dm.test_categories:
        dataset = dm.test_dataset(category)
        panels = _panels(out, category)
        assert len(panels) == len(dataset)  # save all
        for panel in panels:
            index = next(i for i, r in enumerate(dataset.records) if r.image.stem in panel.name)
            height, width = display_size(dataset[index]["orig_size"].tolist())
            size = Image.open(panel).size
            assert height != width and size[0] == 4 * width + 3 * PANEL_GAP + PANEL_BAR  # not squashed
            heights.add(size[1] - height)  # the header band is the same on every panel
    assert len(heights) == 1
    _check_report(out, dm.test_categories)


def test_transductive_method_has_no_per_image_decision(make_cfg):
    # APRIL-GAN's k-shot default fuses scores by a min-max over the category's test set (method.transductive)
    cfg = make_cfg(
        "evaluate", "method=aprilgan", "method.feature_layers=[1,3]", "method.k_shot=1", "data.categories=[bottle_syn]"
    )
    _, objects = evaluate(cfg)
    assert objects["method"].transductive
    out = objects["module"].output_dir
    rows = _predictions(out)
    assert len(rows) == len(objects["datamodule"].test_dataset("bottle_syn"))
    assert {r["decision"] for r in rows} == {"n/a"}
    assert all(r["threshold_source"].startswith("n/a: a transductive method") for r in rows)
    assert len(_panels(out, "bottle_syn")) == 2  # conftest's module.num_overlays=2
    assert np.isfinite([float(r["image_score"]) for r in rows]).all()
