"""Nothing a user had is lost: fresh run folders, results kept on failure, clear one-line errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vlmad.config import CONF_DIR, fresh_dir


def test_fresh_dir_never_reuses_a_folder(tmp_path):
    from vlmad import config

    first = fresh_dir(str(tmp_path / "run"))
    assert fresh_dir(str(tmp_path / "run")) == first  # the same run resolving again (e.g. a DDP child)
    config._FRESH.clear()  # another process
    second = fresh_dir(str(tmp_path / "run"))
    assert first != second and second.endswith("run-1")
    (tmp_path / "run" / "metrics.csv").write_text("kept")
    config._FRESH.clear()
    assert fresh_dir(str(tmp_path / "run")).endswith("run-2")
    assert (tmp_path / "run" / "metrics.csv").read_text() == "kept"


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    """The shipped hydra config, resolved twice at a frozen clock, yields two distinct existing folders."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from vlmad import config

    monkeypatch.chdir(tmp_path)
    OmegaConf.register_new_resolver("now", lambda fmt: "2026-01-01_00-00-00", replace=True, use_cache=True)
    try:
        dirs = []
        for _ in range(2):
            config._FRESH.clear()  # each run is a process of its own
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("evaluate", ["backbone=tiny", "data=synthetic"], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            dirs.append(str(cfg.hydra.run.dir))
            assert str(cfg.hydra.run.dir) == dirs[-1]  # resolved once per config (cached)
    finally:
        from datetime import datetime

        OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), replace=True, use_cache=True)
    assert dirs[0] != dirs[1]
    assert all((tmp_path / d).is_dir() for d in dirs)


def test_a_late_failure_keeps_finished_categories_and_records_the_error(make_cfg, monkeypatch):
    """Category 2 fails: metrics.csv keeps category 1, run.json says failed and why, the report lists it."""
    import json

    from vlmad.engine.module import AnomalyModule
    from vlmad.engine.run import evaluate
    from vlmad.outputs.report import collect

    cfg = make_cfg("evaluate", "method=winclip")
    original = AnomalyModule._open_category

    def open_category(self, category, class_name):
        original(self, category, class_name)  # closes the previous category
        if self.results:  # the second category
            raise RuntimeError(f"disk full while scoring {category}")

    monkeypatch.setattr(AnomalyModule, "_open_category", open_category)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate(cfg)
    out = tmp_out(cfg)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[0] == "carpet_syn"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "disk full while scoring bottle_syn" in info["error"]
    done, failed = collect(out.parent)
    assert not done and "disk full" in failed[0]["reason"]


def tmp_out(cfg):
    from pathlib import Path

    return Path(cfg.paths.output_dir)


def test_evaluate_refuses_the_comparison_experiment(make_cfg):
    from vlmad.engine.run import evaluate
    from vlmad.errors import ConfigError

    with pytest.raises(ConfigError, match=r"vlmad compare experiment="):
        evaluate(make_cfg("evaluate", "experiment=comparison"))


def test_resume_removes_partial_checkpoint_writes(tmp_path):
    import torch

    from vlmad.engine.checkpoint import atomic_torch_save, remove_partial_writes

    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt.tmp").write_bytes(b"torn")
    (tmp_path / "last.ckpt.1234.tmp").write_bytes(b"torn")
    removed = remove_partial_writes(tmp_path)
    assert [p.name for p in removed] == ["last.ckpt.1234.tmp", "last.ckpt.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_truncated_checkpoint_is_named(tmp_path):
    import torch

    from vlmad.engine.checkpoint import CheckpointMismatchError, read_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointMismatchError, match=r"last\.ckpt: not a readable checkpoint"):
        read_checkpoint(path)


def _entry(script: str, *overrides: str, env: dict | None = None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, str(root / script), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=root,
    )


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    """A wrong data root: one line naming it, exit 2, no traceback, before any backbone is built."""
    missing = tmp_path / "no_such_mvtec"
    out = f"hydra.run.dir={tmp_path / 'run'}"
    proc = _entry("evaluate.py", "backbone=tiny", "data=mvtec", f"data.root={missing}", out)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlmad: error:")]
    assert len(errors) == 1 and str(missing) in errors[0]
    assert "Traceback" not in proc.stderr and "ClipBackbone" not in proc.stderr
    debug = _entry(
        "evaluate.py", "backbone=tiny", "data=mvtec", f"data.root={missing}", out + "2", env={"VLMAD_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_wrong_data_root_is_reported_before_torch_and_lightning_load(tmp_path):
    """The dataset trees are read before the ~12 s of torch / Lightning imports: the error comes in about a second,
    and run.json records it as the run would."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    missing, out = tmp_path / "no_such_mvtec", tmp_path / "run"
    cmd = [sys.executable, "-X", "importtime", "evaluate.py", "data=mvtec", f"data.root={missing}"]
    cmd += [f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not imported & {"torch", "lightning", "open_clip"}
    assert f"vlmad: error: DataError: dataset root not found: {missing}" in proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == f"DataError: dataset root not found: {missing}"


def test_damaged_data_is_reported_at_once_before_the_backbone(make_cfg, synthetic_roots, tmp_path, monkeypatch):
    """A corrupt image in the last category and a wrong-size mask: one DataError naming both, nothing scored."""
    import shutil

    from PIL import Image

    from vlmad.backbones import ClipBackbone
    from vlmad.data import DataError
    from vlmad.engine.run import evaluate

    root = tmp_path / "damaged"
    shutil.copytree(synthetic_roots["mvtec"], root)
    corrupt = sorted((root / "bottle_syn" / "test").glob("*/*.png"))[-1]
    corrupt.write_bytes(b"\x89PNG truncated")
    mask = sorted((root / "carpet_syn" / "ground_truth").glob("*/*.png"))[0]
    Image.new("L", (10, 10)).save(mask)
    built = []
    monkeypatch.setattr(ClipBackbone, "__init__", lambda *a, **k: built.append(1) or None)
    cfg = make_cfg("evaluate", "method=winclip", f"data.root={root}")
    with pytest.raises(DataError) as err:
        evaluate(cfg)
    assert str(corrupt) in str(err.value) and str(mask) in str(err.value)
    assert not built and not (tmp_out(cfg) / "metrics.csv").exists()


def test_training_a_training_free_method_is_refused_before_the_backbone(make_cfg, monkeypatch):
    from vlmad.backbones import ClipBackbone
    from vlmad.engine.run import train
    from vlmad.errors import ConfigError

    built = []
    monkeypatch.setattr(ClipBackbone, "__init__", lambda *a, **k: built.append(1) or None)
    with pytest.raises(ConfigError, match=r"nothing to train; use evaluate\.py"):
        train(make_cfg("train", "method=winclip"))
    assert not built
