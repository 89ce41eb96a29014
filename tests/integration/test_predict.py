"""``vlmad.deploy.predict`` on generated images with the tiny random-weights backbone."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmad.config import compose
from vlmad.deploy.predict import PredictError, predict

BASE = ["backbone=tiny", "backbone.image_size=64", "method=winclip", "batch_size=2", "device=cpu", "class_name=bottle"]


@pytest.fixture
def bottle(synthetic_roots):
    """The generated bottle_syn category (train/good: 4 normal images; test: 2 good + 2 defective)."""
    return synthetic_roots["mvtec"] / "bottle_syn"


def _run(tmp_path, name: str, *overrides: str) -> tuple[list[dict], object]:
    out = tmp_path / name
    return predict(compose("predict", [*BASE, *overrides], out)), out


def _csv(out) -> list[dict]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def _make_ckpt(path) -> None:
    """A WinCLIP checkpoint written by the project's own module (no learned tensors, only its settings)."""
    import lightning as L

    from vlmad.backbones import ClipBackbone
    from vlmad.engine.module import AnomalyModule
    from vlmad.methods.winclip import WinCLIP

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.strategy.connect(AnomalyModule(WinCLIP(ClipBackbone("vlmad-tiny", None, 64))))
    trainer.save_checkpoint(path)


def test_folder_with_corrupt_and_unsupported_files(tmp_path, bottle):
    folder = tmp_path / "inputs"
    folder.mkdir()
    good = sorted(bottle.glob("test/*/*.png"))
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"{i:02d}_{path.parent.name}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really an image")
    (folder / "notes.txt").write_text("not an image")
    rows, out = _run(tmp_path, "run", f"input={folder}", "threshold.value=0.5")

    assert len(rows) == len(good) and len(_csv(out)) == len(good)
    assert {r["threshold"] for r in rows} == {0.5}
    assert all(r["is_anomalous"] == (r["score"] > 0.5) for r in rows)
    skipped = (out / "skipped.txt").read_text()
    assert "broken.png\tunreadable" in skipped and "notes.txt\tunsupported extension" in skipped
    for path in folder.glob("0*.png"):
        mask = np.asarray(Image.open(out / "masks" / f"{path.stem}.png"))
        assert mask.shape == Image.open(path).size[::-1] and set(np.unique(mask)) <= {0, 255}
    assert json.loads((out / "threshold.json").read_text())["source"] == "value"

    # use=pixel: an image is anomalous when its map's max exceeds the pixel threshold
    rows, _ = _run(
        tmp_path, "pixel", f"input={folder}", "threshold.value=0.5", "threshold.pixel_value=0.3", "threshold.use=pixel"
    )
    assert {r["threshold"] for r in rows} == {0.3} and all(r["is_anomalous"] == (r["score"] > 0.3) for r in rows)


def test_outputs_are_evaluations_panels_columns_and_report(tmp_path, bottle):
    """The same labelled panels, predictions.csv columns and report.html as evaluation; one mode for every file."""
    from vlmad.outputs.predictions import PREDICTION_COLUMNS

    folder = tmp_path / "inputs"
    folder.mkdir()
    wide = Image.open(sorted(bottle.glob("test/*/*.png"))[0]).resize((96, 48))  # not the model's square
    wide.save(folder / "wide.png")
    shutil.copy(sorted(bottle.glob("test/good/*.png"))[0], folder / "square.png")
    rows, out = _run(tmp_path, "run", f"input={folder}", "threshold.value=0.5", "threshold.pixel_value=0.4")
    with (out / "predictions.csv").open() as f:
        assert tuple(csv.DictReader(f).fieldnames) == PREDICTION_COLUMNS
    table = {Path(r["path"]).name: r for r in _csv(out)}
    assert {r["category"] for r in table.values()} == {"bottle"} and {r["label"] for r in table.values()} == {""}
    for r in rows:
        assert table[Path(r["path"]).name]["decision"] == ("NG" if r["image_score"] > 0.5 else "OK")
        assert float(table[Path(r["path"]).name]["pixel_threshold"]) == 0.4
    wide_panel = np.asarray(Image.open(out / "heatmaps" / "bottle" / "wide.png"))
    square_panel = np.asarray(Image.open(out / "heatmaps" / "bottle" / "square.png"))
    # evaluation's render_panel: 4 tiles at the image's own aspect ratio (256 px long side) + the colour bar
    assert wide_panel.shape[1] == 4 * 256 + 3 * 4 + 90 and square_panel.shape[1] == 4 * 256 + 3 * 4 + 90
    assert square_panel.shape[0] - wide_panel.shape[0] == 256 - 128  # the 2:1 image keeps its shape
    assert np.asarray(Image.open(out / "masks" / "wide.png")).shape == (48, 96)
    report = (out / "report.html").read_text()
    assert report.count('<img class="panel"') == 2 and "wide.png" in report and "image 0.5" in report
    assert not list(out.glob(".maps*"))  # the run's temporary maps are gone
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # predictions.csv and threshold.json as every other output


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, bottle):
    image = sorted((bottle / "test" / "good").glob("*.png"))[0]
    _, out = _run(tmp_path, "run", f"input={image}", "threshold.value=0.5")
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(PredictError, match=r"already holds the predictions of an earlier run.*nothing was overwritten"):
        _run(tmp_path, "run", f"input={bottle / 'test' / 'good'}", "threshold.value=0.9")
    assert (out / "predictions.csv").read_bytes() == before
    assert json.loads((out / "threshold.json").read_text())["image_threshold"] == 0.5


def test_calibration_quantile_checkpoint_sidecar_and_reuse(tmp_path, bottle, caplog):
    ckpt = tmp_path / "winclip.ckpt"
    _make_ckpt(ckpt)
    normal = bottle / "train" / "good"
    q = 0.5
    rows, out = _run(
        tmp_path,
        "calib",
        f"input={normal}",
        f"threshold.calibration.dir={normal}",
        f"threshold.calibration.quantile={q}",
        f"ckpt_path={ckpt}",
    )
    saved = json.loads((out / "threshold.json").read_text())
    sidecar = tmp_path / "winclip.ckpt.threshold.json"
    assert json.loads(sidecar.read_text()) == saved
    n = saved["n_normal_images"]
    assert n == len(rows) == 4 and saved["quantile"] == q
    assert {saved["method"], saved["backbone"]} == {"WinCLIP", "vlmad-tiny"}
    # the input is the calibration set itself: the quantile bounds how many normal images are flagged
    assert sum(r["score"] > saved["image_threshold"] for r in rows) / n <= 1 - q + 1 / n

    rows2, out2 = _run(tmp_path, "reuse", f"input={bottle / 'test' / 'good'}", f"ckpt_path={ckpt}")
    assert {r["threshold"] for r in rows2} == {saved["image_threshold"]}
    assert json.loads((out2 / "threshold.json").read_text())["file"] == str(sidecar)

    rows3, _ = _run(tmp_path, "file", f"input={normal}", f"threshold.file={out / 'threshold.json'}")
    assert [r["is_anomalous"] for r in rows3] == [r["is_anomalous"] for r in rows]

    with caplog.at_level(logging.WARNING):  # a differing calibration never overwrites the sidecar
        _run(tmp_path, "calib2", f"input={normal}", f"threshold.calibration.dir={normal}", f"ckpt_path={ckpt}")
    assert json.loads(sidecar.read_text()) == saved
    assert json.loads((tmp_path / "calib2" / "threshold.json").read_text())["quantile"] == 0.99
    assert "not overwritten" in caplog.text


def test_missing_threshold_and_bad_inputs_are_clear_errors(tmp_path, bottle):
    good = bottle / "test" / "good"
    with pytest.raises(PredictError, match=r"threshold\.value.*threshold\.file.*threshold\.calibration\.dir"):
        _run(tmp_path, "a", f"input={good}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no images"):
        _run(tmp_path, "b", f"input={tmp_path / 'empty'}", "threshold.value=0.5")
    with pytest.raises(PredictError, match="only one threshold source"):
        _run(tmp_path, "c", f"input={good}", "threshold.value=0.5", f"threshold.calibration.dir={good}")


def test_few_shot_with_references(tmp_path, bottle):
    normal = bottle / "train" / "good"
    rows, out = _run(
        tmp_path,
        "k1",
        "method.k_shot=1",
        f"references={normal}",
        f"input={bottle / 'test' / 'good'}",
        f"threshold.calibration.dir={normal}",
    )
    refs = (out / "references.txt").read_text().split()
    assert refs == [str(sorted(normal.glob("*.png"))[0])]
    # the reference is left out of calibration (it would score ~0 against itself)
    assert json.loads((out / "threshold.json").read_text())["n_normal_images"] == 3
    assert len(rows) == 2
    with pytest.raises(PredictError, match="references="):
        _run(tmp_path, "k1b", "method.k_shot=1", f"input={normal}", "threshold.value=0.5")


def test_command_line_entry_point(tmp_path, bottle, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    from vlmad.deploy.predict import main

    image = sorted((bottle / "test" / "good").glob("*.png"))[0]
    monkeypatch.chdir(tmp_path)  # Hydra's run dir is relative: outputs/predict/...
    monkeypatch.setattr(sys, "argv", ["predict", *BASE, f"input={image}", "threshold.value=0.5"])
    GlobalHydra.instance().clear()
    handlers = logging.getLogger().handlers[:]
    try:
        main()
    finally:  # Hydra's handlers write to this test's captured stdout: later tests must not log into it
        for handler in logging.getLogger().handlers[:]:
            if handler not in handlers:
                logging.getLogger().removeHandler(handler)
                handler.close()
    (run_dir,) = (tmp_path / "outputs" / "predict").iterdir()
    assert run_dir.name.endswith("_winclip-tiny")
    assert len(_csv(run_dir)) == 1 and (run_dir / "heatmaps" / "bottle" / f"{image.stem}.png").exists()
    assert "1 images scored" in capsys.readouterr().out
    log = (run_dir / "predict.log").read_text()
    assert "predict: 1 images from" in log and "thresholds: image 0.5" in log and "1 images scored" in log

    monkeypatch.setattr(sys, "argv", ["predict", *BASE, "threshold.value=0.5"])  # no input=: one line, exit 2
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "vlmad: error: PredictError: input= is required: an image file or a folder of images, e.g. vlmad predict "
        "input=images/"
    )


def test_non_utf8_file_name_is_written_and_rows_are_kept(tmp_path, bottle, monkeypatch):
    """A Latin-1 file name is scored and written escaped; rows made before a crash stay in predictions.csv."""
    import os

    folder = tmp_path / "inputs"
    folder.mkdir()
    good = sorted(bottle.glob("test/good/*.png"))
    latin1 = os.fsdecode(b"caf\xe9.png")  # not valid UTF-8: a surrogate-escaped str in Python
    shutil.copy(good[0], folder / latin1)
    shutil.copy(good[1], folder / "plain.png")
    rows, out = _run(tmp_path, "run", f"input={folder}", "threshold.value=0.5")
    text = (out / "predictions.csv").read_bytes().decode("utf-8")  # still valid UTF-8
    assert "caf\\xe9.png" in text and len(_csv(out)) == 2 == len(rows)

    import vlmad.deploy.predict as vp

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    original = vp._write_outputs
    monkeypatch.setattr(vp, "_write_outputs", failing)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, "crash", f"input={folder}", "threshold.value=0.5", "batch_size=1")
    assert len(_csv(tmp_path / "crash")) == 1


def test_transductive_settings_are_refused_with_the_per_image_alternative(tmp_path, bottle):
    normal = bottle / "train" / "good"
    aprilgan = ["method=aprilgan", "method.feature_layers=[1,3]", "method.k_shot=1", f"references={normal}"]
    with pytest.raises(PredictError, match=r"transductive.*method\.image_fusion=fixed"):
        _run(tmp_path, "t", *aprilgan, f"input={bottle / 'test' / 'good'}", "threshold.value=0.5")
    fixed = [*aprilgan, "method.image_fusion=fixed", "threshold.value=0.5"]
    rows, _ = _run(tmp_path, "f", *fixed, f"input={bottle / 'test' / 'good'}")
    assert len(rows) == 2 and all(0 <= r["score"] <= 1 for r in rows)


@pytest.mark.parametrize("method", ["anomalydino", "subspacead"])
def test_dino_few_shot_predict_uses_the_methods_reference_views(tmp_path, bottle, method, monkeypatch):
    """predict prepares AnomalyDINO / SubspaceAD with the rotated views their reference_draw asks for."""
    import importlib

    module = importlib.import_module(f"vlmad.methods.{method}")
    cls = next(v for k, v in vars(module).items() if k.lower() == method)
    shapes = []
    prepare = cls.prepare

    def spy(self, class_name, reference_images=None):
        shapes.append(None if reference_images is None else tuple(reference_images.shape))
        return prepare(self, class_name, reference_images)

    monkeypatch.setattr(cls, "prepare", spy)
    normal = bottle / "train" / "good"
    overrides = [f"method={method}", "backbone=tiny_dinov2", "backbone.image_size=56", "method.k_shot=1"]
    out = tmp_path / method
    common = ["batch_size=2", "device=cpu", "class_name=bottle", f"references={normal}", "threshold.value=0.5"]
    rows = predict(compose("predict", [*overrides, *common, f"input={bottle / 'test' / 'good'}"], out))
    assert shapes and shapes[0] is not None and shapes[0][0] > 1  # k=1 reference expanded into its views
    assert len(rows) == 2 and all(0.0 <= float(r["image_score"]) <= 1.0 for r in rows)
    assert (out / "references.txt").read_text().split() == [str(sorted(normal.glob("*.png"))[0])]
