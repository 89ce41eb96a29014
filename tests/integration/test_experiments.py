"""Every experiment config is composed AND run (tiny backbone, generated data, one category), so none can rot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf
from testlib import SYNTHETIC

from vlmad.config import CONF_DIR, compose
from vlmad.engine import compare
from vlmad.engine.run import evaluate, train
from vlmad.metrics.published import PUBLISHED, lookup
from vlmad.metrics.table import read_csv
from vlmad.outputs.report import report

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
CATEGORY = {"mvtec": "bottle_syn", "visa": "candle_syn"}
# the random-weights backbone of each family (and its model name), at a small size (patch 16 / 14)
TINY = {
    "clip": ["backbone=tiny", "backbone.image_size=64"],
    "dinov2": ["backbone=tiny_dinov2", "backbone.image_size=56"],
}
TINY_NAME = {"clip": "vlmad-tiny", "dinov2": "vlmad-tiny-dinov2"}
# 5 test images in one batch (fast_dev_run tests one batch): MuSc's mutual scoring needs at least 5 per category
ONE_CATEGORY = {**SYNTHETIC, "n_test_good": 3}


def _spec(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml"))


def _data(node: str, layout: str, root) -> list[str]:
    option = "synthetic" if layout == "mvtec" else "synthetic_visa"
    return [
        f"{node}={option}",
        f"{node}.root={root}",
        f"{node}.categories=[{CATEGORY[layout]}]",
        *(f"{node}.{k}={v}" for k, v in ONE_CATEGORY.items()),
    ]


@pytest.fixture(scope="module")
def one_category_roots(tmp_path_factory) -> dict:
    """One category per layout (own trees: a category subset of the shared trees would regenerate them)."""
    from vlmad.data.synthetic import generate

    base = tmp_path_factory.mktemp("one_category")
    return {k: generate(base / k, layout=k, categories=[c], **ONE_CATEGORY) for k, c in CATEGORY.items()}


def _family(spec: dict) -> str:
    """The backbone family of an experiment's method (``clip`` for comparisons and method-less experiments)."""
    method = next((d["override /method"] for d in spec.get("defaults", []) if "override /method" in d), None)
    if method is None:
        return "clip"
    target = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml").method._target_
    return get_class(target).backbone_families[0]


def _overrides(task: str, roots: dict, tmp_path, family: str = "clip") -> list[str]:
    base = [
        *TINY[family],
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=8",
        "module.num_overlays=0",
    ]
    if task == "evaluate":
        return [*base, *_data("data", "mvtec", roots["mvtec"])]
    return [
        *base,
        "++trainer.fast_dev_run=true",
        *_data("data", "visa", roots["visa"]),
        *_data("test_data", "mvtec", roots["mvtec"]),
    ]


@pytest.fixture(scope="module")
def aprilgan_ckpt(one_category_roots, tmp_path_factory):
    """Projections from one fast_dev_run step: what the k-shot experiments' ckpt_path points at."""
    out = tmp_path_factory.mktemp("aprilgan_fit")
    cfg = compose(
        "train", [*_overrides("train", one_category_roots, out), "method=aprilgan", "test_after_fit=false"], out / "run"
    )
    _, objects = train(cfg)
    return objects["module"].output_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs(name, one_category_roots, tmp_path, request):
    spec = _spec(name)
    task = spec.get("task_name", "train")  # smoke: `make smoke` = train.py
    config = "evaluate" if task == "evaluate" else "train"
    extra = [f"experiment={name}"]
    if spec.get("ckpt_path") == "???":  # zero-shot projections, k_shot=4 (fitted at train.yaml's seed; the random
        # tiny weights come from backbone.random_seed, so evaluate's own seed loads them)
        extra += [f"ckpt_path={request.getfixturevalue('aprilgan_ckpt')}"]
    family = _family(spec)
    cfg = compose(config, [*_overrides(config, one_category_roots, tmp_path, family), *extra], tmp_path / "run")
    assert cfg.backbone.model_name == TINY_NAME[family]  # the command line wins over the experiment's backbone pin
    if "comparison" in cfg:
        _, objects = compare.run(cfg)
        out = tmp_path / "run"
        assert (out / "comparison.csv").is_file() and (out / "comparison.md").is_file()
        table = read_csv(out / "comparison.csv")
        assert list(table) == [CATEGORY["mvtec"], "mean"]
        labels = [m.get("label", k) for k, m in spec["comparison"]["members"].items()]
        assert set(objects["members"]) == set(labels)
        assert {f"image_auroc/{x}" for x in labels} | {f"pixel_auroc/{x}" for x in labels} <= set(table["mean"])
        for member in spec["comparison"]["members"]:
            assert list(read_csv(out / member / "metrics.csv")) == [CATEGORY["mvtec"], "mean"]
            assert json.loads((out / member / "run.json").read_text())["status"] == "done"
        return
    results, objects = (evaluate if config == "evaluate" else train)(cfg)
    out = objects["module"].output_dir
    assert list(read_csv(out / "metrics.csv")) == [CATEGORY["mvtec"], "mean"] == list(results)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["experiment"] == name and info["backbone"] == TINY_NAME[family]
    assert info["k_shot"] == cfg.method.k_shot and info["eval_set"] == "Synthetic[mvtec]"
    if spec.get("published"):  # derived from the data: generated data has no published numbers
        assert "published" in info and info["published"] is None


def test_report_shows_published_next_to_this_run(one_category_roots, tmp_path):
    # the published id pinned (on generated data the experiment derives none)
    overrides = [
        *_overrides("evaluate", one_category_roots, tmp_path),
        "experiment=winclip",
        "published=winclip_mvtec_k0",
    ]
    results, _ = evaluate(compose("evaluate", overrides, tmp_path / "runs" / "a"))
    rows = report(tmp_path / "runs", per_category=True)["rows"]
    mean = next(r for r in rows if r["category"] == "mean")
    assert mean["published"] == "winclip_mvtec_k0" and mean["n"] == 1
    assert mean["image_auroc"] == pytest.approx(results["mean"]["image_auroc"])
    assert mean["image_auroc (paper)"] == pytest.approx(0.918)
    assert mean["image_ap (paper)"] == pytest.approx(0.965)  # "AUPR" -> image_ap
    assert mean["pixel_aupro (paper)"] == mean["pixel_aupro_legacy (paper)"] == pytest.approx(0.646)  # both
    assert "pixel_ap (paper)" not in mean  # only what the paper reports
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "image_auroc (paper)" in md and "91.8" in md


@pytest.mark.parametrize(
    ("experiment", "overrides", "expected"),
    [
        ("winclip", [], "winclip_mvtec_k0"),
        ("winclip", ["data=visa", "method.k_shot=4"], "winclip_visa_k4"),
        ("winclip", ["method.k_shot=2"], "winclip_mvtec_k2"),
        ("winclip", ["method.k_shot=3"], None),
        ("winclip", ["data=synthetic"], None),
        ("anomalyclip", [], "anomalyclip_visa_to_mvtec"),
        ("anomalyclip", ["data=mvtec"], "anomalyclip_mvtec_to_visa"),
        ("aprilgan", [], "aprilgan_visa_to_mvtec"),
        ("aprilgan", ["data=mvtec"], "aprilgan_mvtec_to_visa"),
        ("aprilgan_fewshot", [], "aprilgan_mvtec_k4"),
        ("aprilgan_fewshot", ["data=visa"], "aprilgan_visa_k4"),
        ("visualad", [], "visualad_visa_to_mvtec"),
        ("visualad", ["data=mvtec"], "visualad_mvtec_to_visa"),
        ("visualad", ["data=synthetic_visa", "test_data=synthetic"], None),
        ("musc", [], "musc_mvtec"),
        ("musc", ["data=visa"], "musc_visa"),
        ("anomalydino", [], "anomalydino_mvtec_k1"),
        ("anomalydino", ["data=visa", "method.k_shot=4"], "anomalydino_visa_k4"),
        ("anomalydino", ["method.k_shot=3"], None),
        ("subspacead", ["method.k_shot=2"], "subspacead_mvtec_k2"),
        ("subspacead", ["data=visa"], "subspacead_visa_k1"),
    ],
)
def test_published_id_follows_data_and_k(tmp_path, experiment, overrides, expected):
    config = "train" if _spec(experiment)["task_name"] == "train" else "evaluate"
    cfg = compose(config, [f"experiment={experiment}", *overrides], tmp_path)
    assert cfg.published == expected and (expected is None or expected in PUBLISHED)


@pytest.mark.parametrize(
    ("data", "epochs", "mosaic"), [("visa", 15, 0.0), ("mvtec", 3, 0.2), ("synthetic_visa", 15, 0.0)]
)
def test_aprilgan_fit_settings_follow_the_fit_set(tmp_path, data, epochs, mosaic):
    cfg = compose("train", ["experiment=aprilgan", f"data={data}"], tmp_path)
    assert (cfg.trainer.max_epochs, cfg.datamodule.mosaic_prob, cfg.seed) == (epochs, mosaic, 111)  # the reference's
    assert compose("train", ["experiment=aprilgan", "trainer.max_epochs=2"], tmp_path).trainer.max_epochs == 2


def test_published_numbers_are_consistent():
    for key in EXPERIMENTS:
        pid = _spec(key).get("published")
        if pid and "${" not in pid:
            assert pid in PUBLISHED, key
    assert {f"winclip_{d}_k{k}" for d in ("mvtec", "visa") for k in (0, 1, 2, 4)} <= set(PUBLISHED)
    # per-category tables reproduce the published means (WinCLIP exactly; AnomalyCLIP's logs within 0.3)
    for pid, tol in [
        ("winclip_mvtec_k0", 0.0006),
        ("winclip_visa_k0", 0.0006),
        ("anomalyclip_visa_to_mvtec", 0.003),
        ("anomalyclip_mvtec_to_visa", 0.003),
    ]:
        rows = lookup(pid)
        categories = [c for c in rows if c != "mean"]
        assert len(categories) == (15 if "mvtec" in pid.split("_to_")[-1] or pid.startswith("winclip_mvtec") else 12)
        for metric in rows[categories[0]]:
            if metric in rows["mean"]:
                mean = np.mean([rows[c][metric] for c in categories])
                assert mean == pytest.approx(rows["mean"][metric], abs=tol), (pid, metric)
    assert lookup("anomalyclip_visa_to_mvtec")["mean"]["pixel_aupro_legacy"] == pytest.approx(0.814)
    assert "pixel_aupro" not in lookup("aprilgan_visa_to_mvtec")["mean"]  # their AUPRO is the legacy variant
    assert lookup("nope") == {} and lookup(None) == {}


def test_side_by_side_table_has_a_paper_row():
    results = {
        "WinCLIP": {"a": {"image_auroc": 0.5}, "mean": {"image_auroc": 0.5}},
        "AnomalyCLIP": {"a": {"image_auroc": 0.7}, "mean": {"image_auroc": 0.7}},
    }
    table = compare.side_by_side(results, {"WinCLIP": "winclip_mvtec_k0", "AnomalyCLIP": "anomalyclip_visa_to_mvtec"})
    assert list(table) == ["a", "mean", "mean (paper)"]
    assert table["mean"] == {"image_auroc/WinCLIP": 0.5, "image_auroc/AnomalyCLIP": 0.7}
    assert table["mean (paper)"] == pytest.approx({"image_auroc/WinCLIP": 0.918, "image_auroc/AnomalyCLIP": 0.915})


def test_paper_settings_skip_the_threshold_calibration(one_category_roots, tmp_path):
    """Research runs pay no OK/NG calibration (issue: it must not tax them); a user's own run (no experiment,
    demo, smoke) keeps it, and a paper setting gets it back with one override."""
    calibrates = {}
    for name in [None, *EXPERIMENTS]:
        spec = _spec(name) if name else {}
        config = "evaluate" if spec.get("task_name", "train" if name else "evaluate") == "evaluate" else "train"
        extra = [f"experiment={name}"] if name else []
        cfg = compose(config, [*_overrides(config, one_category_roots, tmp_path, _family(spec)), *extra], tmp_path)
        calibrates[name] = cfg.module.threshold.calibrate if "module" in cfg else None
    paper = {n for n in EXPERIMENTS if _spec(n).get("published")}
    assert paper >= {"winclip", "anomalyclip", "aprilgan", "visualad", "anomalydino", "subspacead"}
    transductive = {"musc", "aprilgan_fewshot"}  # no calibration to skip: their decision is n/a anyway
    assert {n for n in paper - transductive if calibrates[n] is not False} == set()
    assert calibrates[None] is True and calibrates["demo"] is True and calibrates["smoke"] is True
    cfg = compose("evaluate", [*_overrides("evaluate", one_category_roots, tmp_path), "experiment=winclip"], tmp_path)
    _, objects = evaluate(cfg)
    thresholds = json.loads((objects["module"].output_dir / "thresholds.json").read_text())
    assert all("calibrate=false" in t["source"] for t in thresholds.values())
