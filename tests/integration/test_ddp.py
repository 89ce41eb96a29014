"""Several devices (DDP, 2 CPU processes with gloo) give exactly the single-device results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from testlib import SYNTHETIC, SYNTHETIC_CATEGORIES

from vlmad.config import CONF_DIR
from vlmad.metrics.table import read_csv

ROOT = CONF_DIR.parent
COMMON = ["backbone=tiny", "backbone.image_size=64", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
COMMON += ["datamodule.num_workers=0", "module.num_overlays=1"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]


def _data(node: str, layout: str, root) -> list[str]:
    cats = ",".join(SYNTHETIC_CATEGORIES[layout])
    return [f"{node}.root={root}", f"{node}.categories=[{cats}]", *(f"{node}.{k}={v}" for k, v in SYNTHETIC.items())]


def _one_device(config_name: str, out, *overrides: str) -> None:
    """The 1-device reference, in this process (a subprocess would pay the ~12 s import of the stack again)."""
    from vlmad.config import compose
    from vlmad.engine.run import evaluate, train

    run = train if config_name == "train" else evaluate
    run(compose(config_name, [*COMMON, *overrides], out))


def _run(script: str, out, *overrides: str) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, script, *COMMON, *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_evaluation_on_two_processes_equals_one(synthetic_roots, tmp_path):
    """Whole categories per rank, gathered to rank 0: the same metrics.csv, every category's heatmaps."""
    data = ["method=winclip", "method.k_shot=1", "data=synthetic", *_data("data", "mvtec", synthetic_roots["mvtec"])]
    _one_device("evaluate", tmp_path / "one", *data)
    _run("evaluate.py", tmp_path / "two", *data, *DDP)
    one, two = read_csv(tmp_path / "one" / "metrics.csv"), read_csv(tmp_path / "two" / "metrics.csv")
    assert list(two) == list(one) == [*SYNTHETIC_CATEGORIES["mvtec"], "mean"]
    for category, row in one.items():
        for metric, value in row.items():
            assert two[category][metric] == pytest.approx(value, abs=1e-9, nan_ok=True), (category, metric)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["status"] == "done"
    for category in SYNTHETIC_CATEGORIES["mvtec"]:
        assert list((tmp_path / "two" / "heatmaps" / category).glob("*.png"))
    assert not list((tmp_path / "two").glob("metrics.rank*.csv"))


def test_training_on_two_processes_equals_one_at_the_same_global_batch(synthetic_roots, tmp_path):
    """One epoch, fixed (seed, epoch) order, global batch 4: the learned prompts agree to 1e-5."""
    fit = ["method=anomalyclip", "method.feature_layers=[5,11]", "trainer.max_epochs=1", "test_after_fit=false"]
    fit += ["data=synthetic_visa", *_data("data", "visa", synthetic_roots["visa"])]
    fit += ["test_data=synthetic", *_data("test_data", "mvtec", synthetic_roots["mvtec"])]
    _one_device("train", tmp_path / "one", *fit, "datamodule.batch_size=4")
    _run("train.py", tmp_path / "two", *fit, "datamodule.batch_size=2", *DDP)
    ckpts = [torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=False) for d in ("one", "two")]
    states = [c["state_dict"] for c in ckpts]
    assert states[0].keys() == states[1].keys() and not any(".backbone." in k for k in states[0])
    assert ckpts[0]["global_step"] == ckpts[1]["global_step"] == 2  # 8 fit images, global batch 4: 2 steps each
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-5, rtol=0)


def test_categories_are_split_whole_and_balanced():
    from vlmad.data.datamodule import split_categories

    sizes = {"a": 100, "b": 40, "c": 60, "d": 10, "e": 50}
    parts = split_categories(sizes, 2)
    assert sorted(c for p in parts for c in p) == sorted(sizes)  # every category once, none split
    assert [sum(sizes[c] for c in p) for p in parts] == [140, 120]  # greedy, largest first
    assert all(p == sorted(p, key=list(sizes).index) for p in parts)  # original order kept per rank
    assert split_categories(sizes, 1) == [list(sizes)]


def test_fit_sampler_ranks_together_give_the_one_device_batches():
    from vlmad.data.datamodule import EpochShuffleSampler

    one = EpochShuffleSampler(8, seed=3)
    ranks = [EpochShuffleSampler(8, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        order, shares = list(one), [list(s) for s in ranks]
        for step in range(2):  # global batch 4 = 2 per rank
            assert sorted(shares[0][2 * step : 2 * step + 2] + shares[1][2 * step : 2 * step + 2]) == sorted(
                order[4 * step : 4 * step + 4]
            )
    assert len(EpochShuffleSampler(7, 0, 1, 2)) == 4  # padded to equal lengths: no rank waits for another


def test_several_devices_in_a_local_multirun_job_are_refused(make_cfg, monkeypatch):
    """Lightning's DDP children would write outside the sweep job's folder: refused unless SLURM starts the ranks."""
    import vlmad.engine.run
    from vlmad.errors import ConfigError

    monkeypatch.setattr(vlmad.engine.run, "in_multirun", lambda: True)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    cfg = make_cfg("evaluate", "method=winclip", "trainer.devices=2")
    with pytest.raises(ConfigError, match="hydra/launcher=slurm"):
        vlmad.engine.run._check_devices(cfg)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    vlmad.engine.run._check_devices(cfg)  # SLURM starts every rank itself: allowed
    monkeypatch.delenv("SLURM_NTASKS")
    vlmad.engine.run._check_devices(make_cfg("evaluate", "method=winclip"))  # one device: allowed
