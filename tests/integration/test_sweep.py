"""Hydra multirun through the entry points (subprocesses), then `vlmad.outputs.report` on the sweep directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from testlib import SYNTHETIC

from vlmad.config import CONF_DIR
from vlmad.metrics.table import read_csv
from vlmad.outputs.report import main as report_main

ROOT = CONF_DIR.parent
CATEGORY = {"mvtec": "bottle_syn", "visa": "candle_syn"}
COMMON = [
    "backbone=tiny",
    "backbone.image_size=64",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "module.num_overlays=0",
    "datamodule.batch_size=4",
]


def _data(node: str, layout: str) -> list[str]:
    # the generator arguments of the tree below, so the reader finds it instead of regenerating
    return [f"{node}.categories=[{CATEGORY[layout]}]", *(f"{node}.{k}={v}" for k, v in SYNTHETIC.items())]


def _multirun(script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, script, "-m", *COMMON, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict:
    from vlmad.data.synthetic import generate

    base = tmp_path_factory.mktemp("sweep_data")
    return {k: generate(base / k, layout=k, categories=[c], **SYNTHETIC) for k, c in CATEGORY.items()}


@pytest.fixture(scope="module")
def eval_sweep(roots, tmp_path_factory):
    """2 k_shot x 2 seeds on a good root, and the same 4 jobs on a root that cannot be used (a file)."""
    tmp = tmp_path_factory.mktemp("eval_sweep")
    bad = tmp / "not_a_directory"
    bad.write_text("x")
    data = ["data=synthetic", f"data.root={roots['mvtec']},{bad}", *_data("data", "mvtec")]
    proc = _multirun(
        "evaluate.py", "method=winclip", "method.k_shot=0,1", "seed=0,1", *data, f"hydra.sweep.dir={tmp / 'sweep'}"
    )
    return proc, tmp / "sweep", bad


def test_sweep_jobs_have_own_dirs_and_report_groups_mean_std_over_seeds(eval_sweep, capsys):
    proc, sweep, bad = eval_sweep
    assert proc.returncode == 2  # the failing jobs (a user error) make the sweep exit as a user error ...
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr  # ... in one line, naming the job
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vlmad: error: sweep job ") and f"data.root={bad}" in errors[0]
    good = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(good) == 4 and len({p.name for p in good}) == 4  # ... but every good job finished in its own dir
    infos = [json.loads((d / "run.json").read_text()) for d in good]
    assert all(i["status"] == "done" and i["method"] == "WinCLIP" for i in infos)
    assert sorted((i["k_shot"], i["seed"]) for i in infos) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    result = report_main([str(sweep)])
    assert "± " in capsys.readouterr().out
    rows = {r["k_shot"]: r for r in result["rows"]}
    assert set(rows) == {0, 1} and all(r["n"] == 2 and r["category"] == "mean" for r in rows.values())
    for k, row in rows.items():
        runs = [read_csv(d / "metrics.csv")["mean"] for d, i in zip(good, infos, strict=True) if i["k_shot"] == k]
        for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            values = np.array([r[metric] for r in runs])
            assert row[metric] == pytest.approx(values.mean())
            assert row[f"{metric}_std"] == pytest.approx(values.std())
    assert (sweep / "report.csv").is_file()
    md = (sweep / "report.md").read_text()
    assert "Failed or incomplete (4)" in md

    # the failing jobs are listed separately, with the override that broke them
    failed = result["failed"]
    assert len(failed) == 4 and all(f"data.root={bad}" in f["overrides"] for f in failed)
    assert not any(f"data.root={bad}" in i["overrides"] for i in infos)


def test_report_per_category_and_sample_std(eval_sweep):
    _, sweep, _ = eval_sweep
    rows = report_main([str(sweep), "--per-category", "--ddof", "1"])["rows"]
    assert [r["category"] for r in rows] == ["bottle_syn", "mean"] * 2
    by_k = next(r for r in rows if r["k_shot"] == 0 and r["category"] == "bottle_syn")
    jobs = [p.parent for p in sweep.rglob("metrics.csv")]
    values = [
        read_csv(d / "metrics.csv")["bottle_syn"]["image_auroc"]
        for d in jobs
        if json.loads((d / "run.json").read_text())["k_shot"] == 0
    ]
    assert by_k["image_auroc_std"] == pytest.approx(np.std(values, ddof=1))


def test_train_multirun_over_methods(roots, tmp_path):
    sweep = tmp_path / "sweep"
    fit = ["data=synthetic_visa", f"data.root={roots['visa']}", *_data("data", "visa")]
    target = ["test_data=synthetic", f"test_data.root={roots['mvtec']}", *_data("test_data", "mvtec")]
    proc = _multirun(
        "train.py",
        "method=anomalyclip,aprilgan",
        "++trainer.fast_dev_run=true",
        *fit,
        *target,
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = report_main([str(sweep)])
    assert not result["failed"]
    assert {(r["method"], r["fit_set"], r["eval_set"]) for r in result["rows"]} == {
        ("AnomalyCLIP", "Synthetic[visa]", "Synthetic[mvtec]"),
        ("AprilGAN", "Synthetic[visa]", "Synthetic[mvtec]"),
    }


def test_local_launcher_runs_jobs_in_parallel_processes(roots, tmp_path, capsys):
    """hydra/launcher=local (submitit): 2 jobs as their own processes; both write outputs; the report aggregates."""
    sweep = tmp_path / "sweep"
    data = ["data=synthetic", f"data.root={roots['mvtec']}", *_data("data", "mvtec")]
    proc = _multirun(
        "evaluate.py", "hydra/launcher=local", "method=winclip", "seed=0,1", *data, f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(jobs) == 2
    pids = {json.loads((d / "run.json").read_text())["pid"] for d in jobs}
    assert len(pids) == 2 and os.getpid() not in pids  # each job ran in a process of its own
    assert list(sweep.glob(".submitit/*"))  # submitit's job folders: the launcher really was submitit
    rows = report_main([str(sweep)])["rows"]
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["seeds"] == "0 1"
