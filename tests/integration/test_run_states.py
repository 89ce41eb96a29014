"""Exit codes and run states that never lie: signals, a run that reports nothing, damaged run.json, disk full,
too few test images for a transductive method, unknown config choices, a file that holds no weights."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testlib import SYNTHETIC, SYNTHETIC_CATEGORIES

from vlmad.config import CONF_DIR

ROOT = CONF_DIR.parent


def _signal_in_second_category(monkeypatch, signum: int) -> None:
    """The run receives ``signum`` when it opens its second category (the first is finished and written)."""
    from vlmad.engine.module import AnomalyModule

    original = AnomalyModule._open_category

    def open_category(self, category, class_name):
        original(self, category, class_name)  # closes (and writes) the previous category
        if self.results:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(AnomalyModule, "_open_category", open_category)


def _run_json(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())


@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGTERM, 143, "terminated by SIGTERM"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_during_evaluation_exits_128_plus_signal_and_records_it(
    make_cfg, monkeypatch, capsys, signum, code, said
):
    """SIGTERM used to exit 0 with an empty error, SIGINT exit 1 with ``SystemExit: 1``."""
    from vlmad.engine.run import evaluate

    cfg = make_cfg("evaluate", "method=winclip")
    _signal_in_second_category(monkeypatch, signum)
    with pytest.raises(SystemExit) as stopped:
        evaluate(cfg)
    assert stopped.value.code == code
    info = _run_json(cfg)
    assert info["status"] == "failed" and said in info["error"]
    assert capsys.readouterr().err.count(said) == 1  # said once
    rows = (Path(cfg.paths.output_dir) / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("carpet_syn,")  # the finished category, a complete file
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored: the next run in this process works


def test_sigterm_through_the_entry_point_exits_143(synthetic_roots, tmp_path):
    """The whole path (Hydra, the task wrappers): exit status 143, not 0."""
    entry = tmp_path / "sigterm_evaluate.py"
    entry.write_text(
        "import os, signal\n"
        "from vlmad.engine.module import AnomalyModule\n"
        "original = AnomalyModule._open_category\n"
        "def open_category(self, category, class_name):\n"
        "    original(self, category, class_name)\n"
        "    if self.results:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "AnomalyModule._open_category = open_category\n"
        "import hydra\n"
        "from vlmad.cli import evaluate_task\n"
        "from vlmad.config import CONF_DIR\n"
        "hydra.main(version_base='1.3', config_path=str(CONF_DIR), config_name='evaluate')(evaluate_task)()\n"
    )
    cats = ",".join(SYNTHETIC_CATEGORIES["mvtec"])
    overrides = ["backbone=tiny", "backbone.image_size=64", "trainer.accelerator=cpu", "datamodule.num_workers=0"]
    overrides += ["trainer.enable_progress_bar=false", "module.num_overlays=0", "method=winclip", "data=synthetic"]
    overrides += [f"data.root={synthetic_roots['mvtec']}", f"data.categories=[{cats}]"]
    overrides += [f"data.{k}={v}" for k, v in SYNTHETIC.items()]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(entry), *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.count("terminated by SIGTERM") == 1 and "Traceback" not in proc.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == "terminated by SIGTERM"


def test_sigterm_during_training_exits_143(make_cfg, monkeypatch):
    from vlmad.engine.module import AnomalyModule
    from vlmad.engine.run import train

    cfg = make_cfg("train", "method=anomalyclip", "method.feature_layers=[5,11]", "trainer.max_epochs=1")
    original = AnomalyModule.training_step

    def training_step(self, batch, batch_idx):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(AnomalyModule, "training_step", training_step)
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 143
    assert _run_json(cfg)["status"] == "failed" and _run_json(cfg)["error"] == "terminated by SIGTERM"


def test_train_without_test_after_fit_ends_done(make_cfg):
    """No metrics to report: run.json used to stay ``running`` forever."""
    from vlmad.engine.run import train

    cfg = make_cfg("train", "method=anomalyclip", "method.feature_layers=[5,11]", "trainer.max_epochs=1")
    cfg.test_after_fit = False
    train(cfg)
    assert _run_json(cfg)["status"] == "done"


def test_report_lists_a_damaged_run_json_and_reports_the_rest(tmp_path, capsys):
    from vlmad.outputs.report import collect, main

    good = {"status": "failed", "error": "RuntimeError: boom", "overrides": ["seed=1"]}
    for name, text in [("0", json.dumps(good)), ("1", '{"status": "do'), ("2", "\x00garbage"), ("3", "[1, 2]")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(text)
    _, failed = collect(tmp_path)
    reasons = {f["dir"]: f["reason"] for f in failed}
    assert reasons["0"] == "failed: RuntimeError: boom"
    assert all(reasons[d].startswith("unreadable run.json: ") and "run.json" in reasons[d] for d in "123")
    main([str(tmp_path)])  # a table, no traceback
    assert "unreadable run.json" in capsys.readouterr().out


def test_report_on_a_missing_folder_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vlmad.outputs.report", str(tmp_path / "typo")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no such folder" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_report_calls_a_running_job_whose_process_is_gone_killed(tmp_path):
    """The job's metrics.rank*.csv hold its finished categories; run.json still says running (the process got
    SIGKILL): the report says killed and lists them."""
    import socket

    from vlmad.metrics.table import write_csv
    from vlmad.outputs.report import collect

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "0").mkdir()
    info = {"status": "running", "host": socket.gethostname(), "pid": gone.pid, "overrides": []}
    (tmp_path / "0" / "run.json").write_text(json.dumps(info))
    write_csv(tmp_path / "0" / "metrics.rank0.csv", {"carpet_syn": {"image_auroc": 0.5}})
    write_csv(tmp_path / "0" / "metrics.rank1.csv", {"grid_syn": {"image_auroc": 0.5}})
    _, failed = collect(tmp_path)
    assert failed[0]["reason"].startswith(f"killed: run.json still says running but process {gone.pid} is gone")
    assert "finished: carpet_syn, grid_syn (metrics.rank0.csv, metrics.rank1.csv)" in failed[0]["reason"]


def test_musc_with_too_few_test_images_is_refused_in_the_data_check(make_cfg, monkeypatch):
    """The synthetic categories have 4 test images; MuSc's mutual scoring needs 5: refused before the backbone."""
    from vlmad.backbones import ClipBackbone
    from vlmad.data.records import DataError
    from vlmad.engine.run import build

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the data check")

    monkeypatch.setattr(ClipBackbone, "__init__", no_backbone)
    with pytest.raises(DataError, match=r"4 test images of 'carpet_syn': MuSc's mutual scoring .* at least 5"):
        build(make_cfg("evaluate", "method=musc"), fit=False)


def test_disk_full_is_one_line_naming_the_folder(make_cfg, monkeypatch, capsys):
    import vlmad.engine.module
    from vlmad.engine.run import evaluate
    from vlmad.errors import exit_on_user_error

    cfg = make_cfg("evaluate", "method=winclip")

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vlmad.engine.module, "write_csv", full)
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(evaluate)(cfg)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "[Errno 28]" not in err  # not the OSError's traceback
    lines = [line for line in err.splitlines() if line.startswith("vlmad: error")]
    assert len(lines) == 1 and f"{cfg.paths.output_dir}: no space left on device" in lines[0]


def test_unknown_config_choice_is_one_line_listing_the_choices():
    proc = subprocess.run([sys.executable, "evaluate.py", "method=winclp"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmad: error: method=winclp: no such config; choices: ")
    assert "winclip" in lines[0] and "musc" in lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["evaluate.py", "nosuchkey=1"], "Could not override 'nosuchkey'. To append to your config use +nosuchkey=1"),
        (["evaluate.py", "-m", "nosuchkey=1,2"], "Could not override 'nosuchkey'."),  # a sweep: before any job
        (["-m", "vlmad.cli", "predict", "input=x", "+seed=3"], "Could not append to config. An item is already at"),
    ],
)
def test_an_override_hydra_cannot_apply_is_one_line(tmp_path, args, expected):
    """Hydra's 5-line report (and exit 1) for a mistyped key or a wrong ``+``: one line and exit 2 like other user
    errors; HYDRA_FULL_ERROR=1 still gives Hydra's traceback."""
    cmd = [sys.executable, *args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlmad: error: {expected}"), proc.stderr
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "full_key" not in proc.stderr
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_a_file_that_holds_no_weights_is_named_as_such(tmp_path):
    from vlmad.backbones import ClipBackbone
    from vlmad.errors import ConfigError

    garbage = tmp_path / "model.bin"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match="is not a weights file") as refused:
        ClipBackbone("vlmad-tiny", pretrained=str(garbage), image_size=64)
    assert "weights_only" not in str(refused.value) and str(garbage) in str(refused.value)
