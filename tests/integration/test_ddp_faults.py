"""Several devices never hang: uneven splits, idle ranks, a failing or killed rank (2-3 gloo processes, timeouts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmad.config import CONF_DIR
from vlmad.metrics.table import read_csv

ROOT = CONF_DIR.parent
CATEGORIES = ["carpet_syn", "grid_syn", "bottle_syn", "nut_syn"]
DATA = {"image_size": 64, "n_train": 2, "n_test_good": 2, "n_test_defect": 2, "seed": 0}
TIMEOUT_S = 600  # a hang fails the test instead of stalling the suite (a run takes ~15 s on idle cores)
# the script Lightning re-runs for every child rank: VLMAD_TEST_FAULT=raise:<category> / kill:<category> makes the
# rank that opens that category raise or SIGKILL itself
FAULTY_ENTRY = """
import os, signal, sys
from vlmad.engine.module import AnomalyModule

how, _, target = os.environ.get("VLMAD_TEST_FAULT", ":").partition(":")
original = AnomalyModule._open_category

def _open_category(self, category, class_name):
    if category == target and how == "raise":
        raise RuntimeError(f"injected failure in {category}")
    original(self, category, class_name)  # closes (and writes) the previous category
    if category == target and how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)

AnomalyModule._open_category = _open_category
import hydra
from vlmad.cli import evaluate_task
from vlmad.config import CONF_DIR

hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")(evaluate_task)()
"""


def _overrides(root: Path, categories: list[str]) -> list[str]:
    overrides = ["backbone=tiny", "backbone.image_size=64", "trainer.accelerator=cpu", "method=winclip"]
    overrides += ["trainer.enable_progress_bar=false", "datamodule.num_workers=0", "module.num_overlays=0"]
    overrides += ["method.k_shot=1", "data=synthetic", f"data.root={root}", f"data.categories=[{','.join(categories)}]"]
    return overrides + [f"data.{k}={v}" for k, v in DATA.items()]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """run(out, categories, devices, fault=None) -> CompletedProcess; one data tree and one 1-device reference."""
    from vlmad.config import compose
    from vlmad.data.synthetic import generate
    from vlmad.engine.run import evaluate

    base = tmp_path_factory.mktemp("ddp_faults")
    root = generate(base / "data", layout="mvtec", categories=CATEGORIES, **DATA)
    entry = base / "faulty_evaluate.py"
    entry.write_text(FAULTY_ENTRY)

    def run(out: Path, categories: list[str], devices: int, fault: str | None = None) -> subprocess.CompletedProcess:
        overrides = _overrides(root, categories)
        if devices > 1:
            overrides += [f"trainer.devices={devices}", "trainer.strategy=ddp"]
        env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "VLMAD_TEST_FAULT": fault or ":"}
        cmd = [sys.executable, str(entry), *overrides, f"hydra.run.dir={out}"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)

    # the 1-device reference in this process (a subprocess would pay the ~12 s import of the stack again)
    evaluate(compose("evaluate", [*_overrides(root, CATEGORIES), "trainer.devices=1"], base / "one"))
    run.reference = read_csv(base / "one" / "metrics.csv")
    return run


def _same_as_one_device(out: Path, reference: dict, categories: list[str]) -> None:
    rows = read_csv(out / "metrics.csv")
    assert list(rows) == [*categories, "mean"]
    for category in categories:  # each category is scored whole on one rank: equal to the 1-device rows
        for metric, value in reference[category].items():
            assert rows[category][metric] == pytest.approx(value, abs=1e-9, nan_ok=True), (category, metric)
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert not list(out.glob("metrics.rank*.csv")) and not list(out.glob("run.rank*.json"))


@pytest.mark.parametrize(("n_categories", "devices"), [(4, 3)])
def test_uneven_category_splits_finish_with_the_one_device_metrics(ddp, tmp_path, n_categories, devices):
    """4 categories on 3 ranks (2/1/1): used to hang in Lightning's per-loader length check. (3 on 2 ranks, 2/1, is
    the rerun of the failing-rank test below: one run fewer of ~15 s per process.)"""
    proc = ddp(tmp_path / "run", CATEGORIES[:n_categories], devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_as_one_device(tmp_path / "run", ddp.reference, CATEGORIES[:n_categories])


def test_more_devices_than_categories_idle_ranks_sit_out(ddp, tmp_path):
    proc = ddp(tmp_path / "run", CATEGORIES[:2], 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_as_one_device(tmp_path / "run", ddp.reference, CATEGORIES[:2])


def test_a_failing_rank_reports_its_own_cause_in_one_line(ddp, tmp_path):
    """Rank 1 raises in grid_syn: its error (not "Connection closed by peer") on the console and in run.json."""
    proc = ddp(tmp_path / "run", CATEGORIES[:3], 2, fault="raise:grid_syn")
    assert proc.returncode == 1, proc.stderr[-3000:]
    cause = "rank 1: RuntimeError: injected failure in grid_syn"
    assert [line for line in proc.stderr.splitlines() if "vlmad: error" in line] == [f"vlmad: error: {cause}"]
    assert "Traceback" not in proc.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == cause
    # rerun into the folder without the fault: 3 categories on 2 ranks (2/1, the uneven split that used to hang)
    rerun = ddp(tmp_path / "run", CATEGORIES[:3], 2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _same_as_one_device(tmp_path / "run", ddp.reference, CATEGORIES[:3])


def test_a_killed_rank_is_recorded_reported_and_the_folder_reruns(ddp, tmp_path):
    """SIGKILL of rank 1 in its second category: run.json failed (not `running`), the report lists the finished
    categories from metrics.rank*.csv and calls the job killed; a rerun into the folder completes."""
    from vlmad.outputs.report import collect

    out = tmp_path / "sweep" / "0"
    proc = ddp(out, CATEGORIES, 2, fault="kill:nut_syn")  # rank 1 holds grid_syn, then nut_syn
    assert proc.returncode == 1, proc.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == "rank 1 was killed by SIGKILL"
    assert "vlmad: error: rank 1 was killed by SIGKILL" in proc.stderr
    assert "grid_syn" in read_csv(out / "metrics.rank1.csv")
    done, failed = collect(out.parent)
    assert not done and "killed by SIGKILL" in failed[0]["reason"] and "grid_syn" in failed[0]["reason"]
    assert "metrics.rank1.csv" in failed[0]["reason"]
    rerun = ddp(out, CATEGORIES, 2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _same_as_one_device(out, ddp.reference, CATEGORIES)
