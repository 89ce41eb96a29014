"""Nothing a user had is lost: fresh run folders, results kept on failure, clear one-line errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vlmad.config import CONF_DIR, fresh_dir


def test_fresh_dir_never_reuses_a_folder(tmp_path):
    first = fresh_dir(str(tmp_path / "run"))
    second = fresh_dir(str(tmp_path / "run"))
    assert first != second and second.endswith("run-1")
    (tmp_path / "run" / "metrics.csv").write_text("kept")
    assert fresh_dir(str(tmp_path / "run")).endswith("run-2")
    assert (tmp_path / "run" / "metrics.csv").read_text() == "kept"


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    """The shipped hydra config, resolved twice at a frozen clock, yields two distinct existing folders."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(tmp_path)
    OmegaConf.register_new_resolver("now", lambda fmt: "2026-01-01_00-00-00", replace=True, use_cache=True)
    try:
        dirs = []
        for _ in range(2):
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
