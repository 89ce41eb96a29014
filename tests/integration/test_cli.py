"""The installed package: the wheel carries conf/, ``vlmad evaluate`` runs outside the checkout; ``vlmad report``
reads a sweep without importing torch; ``vlmad --help``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from testlib import SYNTHETIC

import vlmad
from vlmad.cli import main as cli_main
from vlmad.config import CONF_DIR
from vlmad.metrics.table import write_csv
from vlmad.outputs.report import write_run_json

ROOT = CONF_DIR.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; torch & co. come from this interpreter's site-packages by a
    .pth line (so nothing downloads), which does not run the checkout's editable-install finder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: the checkout gets no build/ folder
    for name in ("vlmad", "conf"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist"], cwd=tmp)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    )
    (purelib / "_vlmad_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp / "dist").glob("vlmad-*.whl"))
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    return venv


def test_wheel_ships_conf_and_vlmad_evaluate_runs_outside_the_checkout(installed, tmp_path):
    from vlmad.data.synthetic import generate

    where = _run(
        [installed / "bin" / "python", "-c", "import vlmad.config as c; print(c.__file__, c.CONF_DIR)"], tmp_path
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where)  # the wheel's copy, not the checkout
    assert (Path(where[1]) / "evaluate.yaml").is_file() and (Path(where[1]) / "backbone" / "tiny.yaml").is_file()

    root = generate(tmp_path / "data", layout="mvtec", categories=["bottle_syn"], **SYNTHETIC)
    data = [f"data.{k}={v}" for k, v in SYNTHETIC.items()]
    _run(
        [
            installed / "bin" / "vlmad",
            "evaluate",
            "backbone=tiny",
            "backbone.image_size=64",
            "data=synthetic",
            f"data.root={root}",
            "data.categories=[bottle_syn]",
            *data,
            "trainer.accelerator=cpu",
            "datamodule.num_workers=0",
            "module.num_overlays=0",
        ],
        cwd=tmp_path,
    )
    (run,) = (tmp_path / "outputs" / "evaluate").iterdir()  # run folders under the current directory
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    assert "bottle_syn" in (run / "metrics.csv").read_text() and (run / "evaluate.log").is_file()

    report = _run([installed / "bin" / "vlmad", "report", tmp_path / "outputs"], cwd=tmp_path)
    assert "1 finished run(s)" in report.stdout


def _fake_run(job: Path, k_shot: int, seed: int, auroc: float) -> None:
    write_csv(job / "metrics.csv", {"bottle": {"image_auroc": auroc}, "mean": {"image_auroc": auroc}})
    info = {
        "status": "done",
        "method": "WinCLIP",
        "eval_set": "MVTec",
        "k_shot": k_shot,
        "seed": seed,
        "overrides": [f"method.k_shot={k_shot}", f"seed={seed}"],
    }
    write_run_json(job, info)


def test_report_reads_a_sweep_without_torch_in_natural_order(tmp_path):
    for num, (k, seed) in enumerate((k, s) for k in (0, 1, 2, 4, 10) for s in (0, 1)):
        _fake_run(tmp_path / f"{num}_method.k_shot={k},seed={seed}", k, seed, 0.5 + k / 100 + seed / 1000)
    (tmp_path / "11_method.k_shot=10,seed=2").mkdir()  # a job that died before writing anything but run.json
    write_run_json(
        tmp_path / "11_method.k_shot=10,seed=2",
        {"status": "failed", "error": "ValueError: boom", "overrides": ["method.k_shot=10", "seed=2"]},
    )
    guard = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['vlmad.outputs.report', sys.argv[1]]; "
        "runpy.run_module('vlmad.outputs.report', run_name='__main__')"
    )
    out = _run([sys.executable, "-c", guard, tmp_path], cwd=tmp_path).stdout  # `import torch` would fail
    lines = [line.split() for line in out.splitlines() if line.startswith("WinCLIP")]
    assert [int(cells[2]) for cells in lines] == [0, 1, 2, 4, 10]  # k_shot as numbers, not "10" < "2"
    with (tmp_path / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["k_shot"] for r in rows] == ["0", "1", "2", "4", "10"]
    assert [round(float(r["image_auroc"]), 4) for r in rows] == [0.5005, 0.5105, 0.5205, 0.5405, 0.6005]  # seeds
    assert "ValueError: boom" in out and "Failed or incomplete (1)" in out


def test_cli_help_and_unknown_command(capsys, monkeypatch):
    cli_main(["--help"])
    usage = capsys.readouterr().out
    assert all(c in usage for c in ("train", "report", "compare"))
    import vlmad.engine.compare

    seen = []
    monkeypatch.setattr(vlmad.engine.compare, "main", seen.append)
    cli_main(["compare", "experiment=demo", "data.root=x"])
    assert seen == [["experiment=demo", "data.root=x"]]  # the overrides reach vlmad compare's main
    with pytest.raises(SystemExit, match="unknown command 'fit'"):
        cli_main(["fit"])
    from importlib.metadata import version

    cli_main(["--version"])
    assert capsys.readouterr().out == f"vlmad {version('vlmad')}\n"
    report_seen = []
    import vlmad.outputs.report

    monkeypatch.setattr(vlmad.outputs.report, "main", report_seen.append)
    cli_main(["report", "multirun/x"])
    assert report_seen == [["multirun/x"]]


def test_package_description_names_every_method():
    import re

    description = re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    methods = ("WinCLIP", "AnomalyCLIP", "APRIL-GAN", "MuSc", "VisualAD", "AnomalyDINO", "SubspaceAD")
    assert all(m in description for m in methods), description
    assert any(line.strip() in ("dist/", "/dist/") for line in (ROOT / ".gitignore").read_text().splitlines())


def test_public_api_is_lazy_and_complete():
    code = "import sys, vlmad; assert 'torch' not in sys.modules; print(sorted(vlmad.__all__))"
    names = _run([sys.executable, "-c", code], cwd=ROOT).stdout
    for name in ("WinCLIP", "AnomalyCLIP", "AprilGAN", "MuSc", "ClipBackbone", "AnomalyDataModule", "evaluate"):
        assert name in names and getattr(vlmad, name).__name__ == name
