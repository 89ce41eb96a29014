"""logger=wandb end to end, offline: what reaches the run is read back from its local transaction log.

wandb 0.31 writes no ``wandb-summary.json`` / ``config.yaml`` for offline runs, and its Python datastore reader
is gone (the Go core writes the log), so ``_records`` decodes the ``run-<id>.wandb`` LevelDB-style log itself.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import open_dict

from vlmad.engine.checkpoint import CheckpointMismatchError
from vlmad.engine.run import evaluate
from vlmad.metrics.table import read_csv
from vlmad.outputs.loggers import active_run, make_wandb_logger, wandb_mode

pytest.importorskip("wandb")

BLOCK, HEADER = 32768, 7  # wandb's LevelDB log: 32 KiB blocks, 7-byte record headers (crc32, length, type)


def _records(path: Path) -> list:
    """Decode every ``wandb.proto`` Record of an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        chunk += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _read_run(run_dir: Path, wait_s: float = 60.0) -> dict:
    """The run record, merged config and summary (keys as tuples of nested keys), and the exit code.

    wandb-core (its own process) may still be flushing the file when ``wandb.finish`` has returned (seen once in a
    loaded 2-worker run: only the header was on disk), so the file is read until its exit record is there."""
    import time

    deadline = time.monotonic() + wait_s
    logged = _parse_run(run_dir)
    while logged["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
        logged = _parse_run(run_dir)
    return logged


def _parse_run(run_dir: Path) -> dict:
    (log_file,) = run_dir.glob("run-*.wandb")
    run, config, summary, exit_code = None, {}, {}, None
    for record in _records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            summary.update({tuple(u.nested_key) or (u.key,): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run, "config": config, "summary": summary, "exit_code": exit_code}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline W&B with every wandb folder (cache, staging, config) inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    yield
    assert active_run() is None


def _cfg(make_cfg, *overrides: str):
    return make_cfg("evaluate", "method=winclip", "logger=wandb", *overrides)


def _run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))


def _close(a: float, b: float) -> bool:
    # Lightning's self.log stores float32 tensors: W&B gets the float32-rounded value of metrics.csv's float64
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_evaluate_logs_metrics_table_images_and_config(make_cfg, tmp_path, offline):
    _, objects = evaluate(_cfg(make_cfg))
    (run_dir,) = _run_dirs(tmp_path)
    logged = _read_run(run_dir)
    run, summary = logged["run"], logged["summary"]

    assert run.project == "vlmad" and run.display_name == "winclip-synthetic-tiny"
    assert run.run_group == "evaluate-winclip-synthetic" and run.job_type == "evaluate"
    assert list(run.tags) == ["winclip", "synthetic", "tiny", "k0", "seed0"]
    assert logged["config"]["method"]["_target_"] == "vlmad.methods.winclip.WinCLIP"
    assert logged["exit_code"] == 0

    csv_rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert set(csv_rows) == {*objects["datamodule"].test_categories, "mean"}
    for category, row in csv_rows.items():
        for name, value in row.items():
            assert _close(summary[(f"test/{category}/{name}",)], value), (category, name)
    assert ("test/mean/pixel_auroc",) in summary

    (table_file,) = (run_dir / "files" / "media" / "table" / "test").glob("metrics_table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["category", *next(iter(csv_rows.values()))]
    assert [r[0] for r in table["data"]] == list(csv_rows)
    for name, *values in table["data"]:
        for value, column in zip(values, table["columns"][1:], strict=True):
            assert _close(math.nan if value is None else value, csv_rows[name][column])

    images = sorted((run_dir / "files" / "media" / "images" / "test" / "heatmaps").glob("*.png"))
    assert len(images) == 2 * len(objects["datamodule"].test_categories)  # module.num_overlays=2 per category
    captions = summary[("test/heatmaps/bottle_syn", "captions")]
    assert len(captions) == 2 and all(c.startswith("bottle_syn: ") for c in captions)
    assert summary[("test/title",)].startswith("WinCLIP k_shot=0")


def test_jobs_get_their_own_runs_and_failures_are_finished(make_cfg, tmp_path, offline):
    one = ["data.categories=[bottle_syn]"]
    evaluate(_cfg(make_cfg, *one))
    evaluate(_cfg(make_cfg, *one, "method.k_shot=1", "seed=3"))
    # fails after build, with its run started: finished with exit code 1, nothing left active
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # readable, but no vlmad checkpoint
    with pytest.raises(CheckpointMismatchError):
        evaluate(_cfg(make_cfg, *one, f"ckpt_path={tmp_path / 'foreign.ckpt'}"))
    assert active_run() is None

    # run dirs are named by start second and a random id: identify the jobs by their seed instead
    runs = {r["config"]["seed"] if r["exit_code"] == 0 else "failed": r for r in map(_read_run, _run_dirs(tmp_path))}
    assert set(runs) == {0, 3, "failed"}
    assert len({r["run"].run_id for r in runs.values()}) == 3
    assert list(runs[0]["run"].tags)[-2:] == ["k0", "seed0"] and list(runs[3]["run"].tags)[-2:] == ["k1", "seed3"]
    assert runs[0]["config"]["method"]["k_shot"] == 0 and runs[3]["config"]["method"]["k_shot"] == 1
    assert ("test/bottle_syn/pixel_auroc",) in runs[3]["summary"]
    assert ("test/bottle_syn/pixel_auroc",) not in runs["failed"]["summary"]
    assert runs["failed"]["exit_code"] == 1

    # fails inside build (data instantiation), before any run starts
    broken = _cfg(make_cfg)
    with open_dict(broken):
        broken.data = {"_target_": "vlmad.data.MVTec", "root": str(tmp_path / "nowhere")}
    with pytest.raises(InstantiationException, match="dataset root not found"):  # hydra wraps the DataError
        evaluate(broken)
    assert active_run() is None and len(_run_dirs(tmp_path)) == 3


def test_wandb_mode_offline_without_api_key(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    assert make_wandb_logger(project="p")._wandb_init["mode"] == "offline"

    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.com login user password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "offline"
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode() == "online"
    netrc.unlink()

    monkeypatch.setenv("WANDB_API_KEY", "secret")
    assert wandb_mode() == "online"
    assert make_wandb_logger(project="p", offline=True)._wandb_init["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit mode always wins
    assert wandb_mode() == "disabled"
    assert make_wandb_logger(project="p", tags=["a"], extra_tags=["k1"])._wandb_init["tags"] == ["a", "k1"]


def test_report_is_logged_from_memory(tmp_path, monkeypatch):
    """No metrics.csv is read: the results dict and the given panel files are what reaches the run."""
    import numpy as np
    from PIL import Image

    from vlmad.metrics.names import METRIC_NAMES
    from vlmad.outputs import loggers

    class FakeRun:
        tags = ()

        def __init__(self):
            self.summary = {}

        def log(self, payload):
            self.logged = payload

    run = FakeRun()
    monkeypatch.setattr(loggers, "active_run", lambda: run)
    panel = tmp_path / "elsewhere" / "00_worst_fp_good_001.png"
    panel.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(panel)
    results = {"mean": {"image_auroc": 0.75, "extra": 1.0}, "a": {"image_auroc": 0.5}, "b": {"image_auroc": 1.0}}
    loggers.log_test_report(results, "title", {"a": [panel]})
    assert not list(tmp_path.rglob("*.csv"))
    table = run.logged["test/metrics_table"]
    assert table.columns == ["category", *METRIC_NAMES, "extra"]
    assert [row[0] for row in table.data] == ["a", "b", "mean"]  # metrics.csv's order: mean last
    assert table.data[2][1 + METRIC_NAMES.index("image_auroc")] == 0.75 and table.data[2][-1] == 1.0
    (image,) = run.logged["test/heatmaps/a"]
    assert image._caption == "a: worst_fp_good_001" and "test/heatmaps/b" not in run.logged
    assert run.summary["test/title"] == "title"
