"""``vlmad export precision=int8``: NNCF INT8 of the OpenVINO model behind an accuracy gate.

Random weights: these tests check the mechanics (calibration, ignored head, agreement, gate, manifest), not
real-weights INT8 accuracy (README, Serve / INT8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmad import deploy
from vlmad.config import compose
from vlmad.deploy.export import export
from vlmad.deploy.quantize import INT8_FILE, QuantizationError, quantize_export


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, synthetic_roots):
    """A WinCLIP export (tiny CLIP cut to 4 blocks, 64 px) quantised with a gate that always passes."""
    base = tmp_path_factory.mktemp("int8")
    shipped = Path(__file__).parents[2] / "vlmad" / "backbones" / "model_configs" / "vlmad-tiny.json"
    config = json.loads(shipped.read_text())
    config["vision_cfg"]["layers"] = 4
    (base / "vlmad-tiny-d4.json").write_text(json.dumps(config))
    category = synthetic_roots["mvtec"] / "bottle_syn"
    overrides = [
        "backbone=tiny",
        "backbone.model_name=vlmad-tiny-d4",
        f"+backbone.model_config={base / 'vlmad-tiny-d4.json'}",
        "backbone.image_size=64",
        "class_name=bottle",
        "method=winclip",
        "format=both",
        "precision=int8",
        f"int8.calibration_dir={category / 'train' / 'good'}",
        f"int8.validation_dir={category}",
        "int8.bias_correction=false",  # both off: seconds instead of a minute on 2 shared cores
        "int8.smooth_quant=false",
        "int8.max_drop=1.0",
        f"output_dir={base / 'model'}",
    ]
    cfg = compose("export", overrides, base / "run")
    return export(cfg), cfg


def test_int8_export_writes_the_agreement_into_the_manifest(int8_export, synthetic_roots):
    folder, _ = int8_export
    info = json.loads((folder / deploy.MANIFEST).read_text())
    assert info["files"] == {"onnx": "model.onnx", "openvino": INT8_FILE}
    assert info["precision"] == {"onnx": "fp32", "openvino": "int8"}
    assert not (folder / "model.xml").exists()  # the fp32 IR is replaced, ONNX stays fp32
    q = info["int8"]
    assert q["model_type"] == "transformer" and q["calibration"]["images"] == 3  # 4 normal images, 1 held out
    head = q["ignored_scope"]
    assert 0 < head["matmuls_fp32"] < head["matmuls_total"]  # the map head is fp32, the transformer blocks INT8
    held = q["held_out"]
    assert held["n_images"] == 1 and -1 <= held["map_rank_correlation_min"] <= 1
    val = q["validation"]
    assert val["n_images"] == 4 and set(val["drop"]) == {"image_auroc", "pixel_auroc", "aupro"}
    for k, drop in val["drop"].items():
        assert drop == pytest.approx(val["fp32"][k] - val["int8"][k])
    assert q["gate"]["metric"].startswith("pixel_auroc") and q["gate"]["passed"] and q["gate"]["max_drop"] == 1.0
    # the INT8 model is quantised (FakeQuantize nodes) and served by the runtime, close to the fp32 ONNX
    assert "FakeQuantize" in (folder / INT8_FILE).read_text()
    images = [str(p) for p in sorted((synthetic_roots["mvtec"] / "bottle_syn" / "test").glob("*/*.png"))]
    int8 = deploy.load(folder, "openvino").predict_files(images)
    fp32 = deploy.load(folder, "onnx").predict_files(images)
    assert np.abs(int8.maps - fp32.maps).max() == pytest.approx(val["max_abs_delta_pixel_score"], abs=1e-5)
    assert 0 < np.abs(int8.maps - fp32.maps).max() < 0.1


def test_int8_gate_refuses_and_writes_nothing(int8_export, tmp_path):
    folder, cfg = int8_export
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    # an fp32 OpenVINO IR to quantise again: converted from the export's fp32 ONNX
    import openvino as ov

    ov.save_model(ov.convert_model(str(folder / "model.onnx")), str(fp32 / "model.xml"), compress_to_fp16=False)
    info = json.loads((folder / deploy.MANIFEST).read_text())
    cfg.int8.max_drop = -1.0  # any result is a drop above it
    with pytest.raises(QuantizationError, match=r"INT8 refused: pixel_auroc drop .* > int8.max_drop=-1\.0"):
        quantize_export(cfg, fp32, info, "model.xml")
    assert not (fp32 / INT8_FILE).exists()  # int8.force=true would write it, with gate.forced in the manifest


def test_int8_export_refused_up_front_without_openvino_or_normal_images(synthetic_roots, tmp_path):
    base = [
        "backbone=tiny",
        "backbone.image_size=64",
        "method=winclip",
        "precision=int8",
        f"output_dir={tmp_path / 'm'}",
    ]
    good = synthetic_roots["mvtec"] / "bottle_syn" / "train" / "good"
    with pytest.raises(QuantizationError, match="format=openvino"):
        export(compose("export", [*base, "format=onnx", f"int8.calibration_dir={good}"], tmp_path / "r1"))
    with pytest.raises(QuantizationError, match="needs normal images"):
        export(compose("export", [*base, "format=openvino"], tmp_path / "r2"))
    assert not (tmp_path / "m").exists()
