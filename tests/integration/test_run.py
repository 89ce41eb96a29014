"""End-to-end: the entry points' functions on generated data with the tiny random-weights backbone."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from vlmad.engine.run import evaluate
from vlmad.metrics.table import read_csv

HEADER = "category,image_auroc,image_ap,image_f1max,pixel_auroc,pixel_ap,pixel_f1max,pixel_aupro"


def _check_metrics_csv(out_dir, categories):
    path = out_dir / "metrics.csv"
    assert path.read_text().splitlines()[0].startswith(HEADER)
    rows = read_csv(path)
    assert list(rows) == [*categories, "mean"]
    for row in rows.values():
        for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert 0.0 <= row[name] <= 1.0 or math.isnan(row[name])
    with path.open() as f:
        assert len(list(csv.reader(f))) == len(categories) + 2


@pytest.mark.parametrize("k_shot", [0, 1])
def test_evaluate_winclip_writes_table_csv_and_heatmaps(make_cfg, k_shot, capsys):
    cfg = make_cfg("evaluate", "method=winclip", f"method.k_shot={k_shot}")
    results, objects = evaluate(cfg)
    out = objects["module"].output_dir
    categories = objects["datamodule"].test_categories
    _check_metrics_csv(out, categories)
    assert set(results) == {*categories, "mean"}
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    for category in categories:
        assert len(list((out / "heatmaps" / category).glob("*.png"))) == 2
    info = json.loads((out / "run.json").read_text())  # provenance: versions, commit, time taken, devices
    assert info["status"] == "done" and 0 < info["duration_s"] < 600 and info["started"]
    assert {"python", "vlmad", "torch", "open_clip_torch", "lightning"} <= set(info["versions"])
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["git_sha"])  # the suite runs from a checkout
    assert info["accelerator"] == "cpu" and "devices" in info and info["precision"] is not None
    if k_shot:
        refs = sorted((out / "references").glob("*.txt"))
        assert len(refs) == len(categories)
        assert all(len(p.read_text().split()) == k_shot for p in refs)


def test_evaluate_subset_of_categories(make_cfg):
    cfg = make_cfg("evaluate", "method=winclip", "data.categories=[bottle_syn]")
    results, _ = evaluate(cfg)
    assert list(results) == ["bottle_syn", "mean"]
    assert results["mean"]["pixel_auroc"] == pytest.approx(results["bottle_syn"]["pixel_auroc"])
