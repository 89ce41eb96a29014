"""Readable logs: a real ``evaluate.py`` run writing to a pipe (not a terminal), and optional loggers' errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from testlib import SYNTHETIC

from vlmad.config import CONF_DIR, compose, job_dirname
from vlmad.errors import ConfigError
from vlmad.logs import make_logger

ROOT = CONF_DIR.parent


@pytest.fixture(scope="module")
def evaluate_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, list]:
    """One tiny zero-shot evaluate.py run in its own working directory; stdout and stderr are pipes."""
    from vlmad.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("logs")
    root = generate(tmp / "data", layout="mvtec", categories=["bottle_syn"], **SYNTHETIC)
    data = [f"data.{k}={v}" for k, v in SYNTHETIC.items()]
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "backbone=tiny",
        "backbone.image_size=64",
        "data=synthetic",
        f"data.root={root}",
        "data.categories=[bottle_syn]",
        *data,
        "trainer.accelerator=cpu",
        "datamodule.num_workers=0",
        "module.num_overlays=0",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    return proc, sorted((tmp / "outputs" / "evaluate").glob("*/evaluate.log"))


def test_evaluate_output_is_quiet_and_the_table_is_in_the_log_file(evaluate_run):
    proc, logs = evaluate_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text  # no progress bar redraws in a pipe
    assert "Tip" not in text and "GPU available" not in text  # Lightning's notices
    assert "Loaded built-in vlmad-tiny model config" not in text  # open_clip's INFO lines
    assert "Final image preprocessing configuration" not in text
    assert "LeafSpec" not in text  # a known Lightning deprecation
    assert "_instantiate2.py" not in text  # warnings name vlmad's code, not Hydra's instantiate
    assert text.count("RANDOM weights") == 1 and "vlmad/backbones/clip.py" in text  # once, attributed to vlmad
    assert f"{ROOT}/vlmad" not in text and "site-packages" not in text  # ... by its package path, not install path
    assert "model = _load_model(" not in text  # no echoed source line
    assert text.count("image_auroc") == 1  # the table printed once on the console ...
    assert len(logs) == 1
    log_text = logs[0].read_text()
    assert "image_auroc" in log_text and "bottle_syn" in log_text and "mean" in log_text  # ... and in the log file
    assert "RANDOM weights" in log_text  # warnings reach the log file too


def test_known_noise_is_dropped_and_warnings_name_the_package_path():
    import logging
    import warnings

    from vlmad.logs import quiet

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet()
        warnings.warn(  # demo / smoke: a few training batches per epoch
            "The number of training batches (2) is smaller than the logging interval Trainer(log_every_n_steps=50).",
            stacklevel=1,
        )
        warnings.warn(  # 2 devices: once per logged metric
            "It is recommended to use `self.log('test/image_auroc', ..., sync_dist=True)` when logging on epoch level",
            stacklevel=1,
        )
        assert not seen
        text = warnings.formatwarning("RANDOM weights", UserWarning, str(ROOT / "vlmad/backbones/clip.py"), 9, "x")
    assert text.rstrip("\n") == "vlmad/backbones/clip.py:9: UserWarning: RANDOM weights"
    installed = "/usr/lib/python3/site-packages/vlmad/backbones/clip.py"
    assert warnings.formatwarning("w", UserWarning, installed, 9).startswith("vlmad/backbones/clip.py:9:")
    # "Initializing distributed: GLOBAL_RANK: ..." is written once per rank at INFO
    assert not logging.getLogger("lightning.fabric.utilities.distributed").isEnabledFor(logging.INFO)


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    cfg = compose("evaluate", ["backbone=tiny"], tmp_path)
    assert cfg.trainer.enable_progress_bar is False  # pytest captures stdout: not a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert compose("train", ["backbone=tiny"], tmp_path).trainer.enable_progress_bar is True  # a terminal: a bar


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_optional_logger_configs_compose_and_fail_in_one_line_without_their_package(kind, tmp_path, monkeypatch):
    import importlib.util

    from hydra.utils import instantiate

    cfg = compose("train", ["backbone=tiny", f"logger={kind}"], tmp_path)
    node = cfg.logger[kind]
    assert node.kind == kind and str(tmp_path) in str(node.get("save_dir") or node.get("tracking_uri"))
    find_spec = importlib.util.find_spec  # the packages are not installed here; make sure of it where they are
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith((kind, "tensorboardX")) else find_spec(name, *a),
    )
    with pytest.raises(Exception, match=f"logger={kind} needs the .* package: pip install 'vlmad\\[{kind}\\]'"):
        instantiate(node)


def test_unknown_optional_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown logger kind"):
        make_logger("neptune")


def test_train_logs_losses_to_csv_by_default(tmp_path):
    cfg = compose("train", ["backbone=tiny"], tmp_path)
    assert cfg.logger.csv._target_.endswith("CSVLogger") and cfg.logger.csv.save_dir == str(tmp_path)


def test_sweep_job_dirname_names_the_swept_overrides(monkeypatch):
    argv = ["evaluate.py", "-m", "backbone=tiny", "data.root=/d", "method.k_shot=0,2", "seed=range(2)"]
    monkeypatch.setattr(sys, "argv", argv)
    job = ["backbone=tiny", "data.root=/d", "method.k_shot=2", "seed=1"]
    assert job_dirname(3, job) == "3_method.k_shot=2,seed=1"  # constant overrides and paths left out
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])  # no sweep on the command line: every non-path override
    assert job_dirname(0, ["data.categories=[a b]", "data.root=/d"]) == "0_data.categories=_a_b"
    assert job_dirname(1, []) == "1"
