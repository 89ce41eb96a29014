"""``vlmad export`` and the torch-free runtime: parity with torch for every exportable method and mode.

The backbone is the tiny random-weights CLIP cut to 4 vision blocks: export time grows with the graph (WinCLIP
runs the blocks three times), and 4 blocks keep each export to a few seconds on 2 shared cores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmad import deploy
from vlmad.config import compose
from vlmad.data import Preprocess, load_image
from vlmad.deploy.export import ExportError, export, export_graph
from vlmad.deploy.predict import PredictError, build_method, load_references, predict
from vlmad.errors import VlmadError

TINY4 = "vlmad-tiny-d4"
VARIANTS = {
    "winclip": ["method=winclip"],
    "winclip_k1": ["method=winclip", "method.k_shot=1", "method.smoothing_sigma=1.5"],
    "anomalyclip": [
        "method=anomalyclip",
        "method.feature_layers=[1,3]",
        "method.dpam_start=1",
        "method.deep_prompt_depth=2",
        "method.deep_prompt_len=2",
    ],
    "aprilgan": ["method=aprilgan", "method.feature_layers=[1,3]"],
    "aprilgan_k2": ["method=aprilgan", "method.feature_layers=[1,3]", "method.k_shot=2", "method.image_fusion=fixed"],
}


@pytest.fixture(scope="session")
def tiny4(tmp_path_factory) -> Path:
    """Model config of the shipped tiny CLIP with 4 vision blocks."""
    shipped = Path(__file__).parents[2] / "vlmad" / "backbones" / "model_configs" / "vlmad-tiny.json"
    config = json.loads(shipped.read_text())
    config["vision_cfg"]["layers"] = 4
    path = tmp_path_factory.mktemp("tiny4") / f"{TINY4}.json"
    path.write_text(json.dumps(config))
    return path


def _overrides(tiny4: Path, good: Path, variant: str) -> list[str]:
    refs = [f"references={good}"] if "_k" in variant else []
    backbone = ["backbone=tiny", f"backbone.model_name={TINY4}", f"+backbone.model_config={tiny4}"]
    return [*backbone, "backbone.image_size=64", "class_name=bottle", *VARIANTS[variant], *refs]


@pytest.fixture(scope="module")
def export_variant(tmp_path_factory, tiny4, synthetic_roots):
    """export_variant(name) -> (name, export folder with ONNX + OpenVINO, the same method prepared in torch, cfg)."""
    cache: dict[str, tuple] = {}
    good = synthetic_roots["mvtec"] / "bottle_syn" / "train" / "good"

    def _get(variant: str) -> tuple:
        if variant not in cache:
            base = tmp_path_factory.mktemp(variant)
            calibration = [f"threshold.calibration.dir={good}"] if variant == "winclip_k1" else []
            cfg = compose(
                "export",
                [*_overrides(tiny4, good, variant), *calibration, "format=both", f"output_dir={base / 'model'}"],
                base / "run",
            )
            folder = export(cfg)
            method, preprocess = build_method(cfg)  # seeded: the same weights as the exported ones
            method.prepare("bottle", load_references(cfg, preprocess)[0] if method.k_shot else None)
            cache[variant] = (variant, folder, method, cfg)
        return cache[variant]

    return _get


@pytest.fixture(params=list(VARIANTS))
def exported(request, export_variant):
    return export_variant(request.param)


def _test_images(synthetic_roots, n: int = 3) -> torch.Tensor:
    paths = sorted((synthetic_roots["mvtec"] / "bottle_syn" / "test").glob("*/*.png"))[:n]
    pre = Preprocess(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    return torch.stack([pre(load_image(p), None)[0] for p in paths])


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_equals_torch_at_batch_1_and_3(exported, backend, synthetic_roots):
    variant, folder, method, _ = exported
    images = _test_images(synthetic_roots)
    with torch.no_grad():
        ref = method(images, ["bottle"] * 3)
    model = deploy.load(folder, backend)  # one file, two batch sizes: the batch axis is dynamic
    for b in (1, 3):
        scores, maps = model.run(images[:b].numpy())
        assert scores.shape == (b,) and maps.shape == (b, 64, 64)
        np.testing.assert_allclose(scores, ref.pred_score[:b].numpy(), atol=1e-4, rtol=0, err_msg=variant)
        np.testing.assert_allclose(maps, ref.anomaly_map[:b].numpy(), atol=1e-4, rtol=0, err_msg=variant)
    assert float(ref.anomaly_map.std()) > 1e-3  # the maps carry structure, not a constant
    check = json.loads((folder / deploy.MANIFEST).read_text())["export_check"][backend]
    assert check["pred_score"] < 1e-4 and check["anomaly_map"] < 1e-4


def test_manifest_describes_the_export(exported, synthetic_roots):
    variant, folder, method, _ = exported
    info = json.loads((folder / deploy.MANIFEST).read_text())
    assert info["method"] == type(method).__name__ and info["class_name"] == "bottle"
    assert info["k_shot"] == method.k_shot == len(info["references"])
    assert info["backbone"] == {"model_name": TINY4, "pretrained": None, "image_size": 64, "patch_size": 16, "depth": 4}
    assert info["preprocess"]["mean"] == list(method.backbone.mean) and info["preprocess"]["resize"] == "squash"
    assert info["inputs"] == [{"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert [o["name"] for o in info["outputs"]] == ["pred_score", "anomaly_map"]
    assert info["files"] == {"onnx": "model.onnx", "openvino": "model.xml"}
    assert all((folder / f).is_file() for f in ("model.onnx", "model.xml", "model.bin"))
    assert info["method_config"]["k_shot"] == method.k_shot
    if variant == "winclip_k1":  # calibrated on train/good without the reference image
        good = synthetic_roots["mvtec"] / "bottle_syn" / "train" / "good"
        assert info["thresholds"]["n_normal_images"] == 3 and info["thresholds"]["source"] == str(good.resolve())
        assert info["references"] == [str(sorted(good.glob("*.png"))[0].resolve())]
    else:
        assert info["thresholds"] is None


def test_runtime_without_torch_in_a_subprocess(export_variant, tmp_path, synthetic_roots):
    _, folder, method, _ = export_variant("winclip_k1")
    src = sorted((synthetic_roots["mvtec"] / "bottle_syn" / "test").glob("*/*.png"))[0]
    rgb = Image.open(src).convert("RGB")
    files = [tmp_path / "rgb.png", tmp_path / "gray.png", tmp_path / "rgba.png"]
    rgb.save(files[0])
    rgb.convert("L").save(files[1])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(files[2])
    script = textwrap.dedent(f"""
        import json, sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "lightning", "open_clip"):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, NoTorch())
        sys.modules["torch"] = None
        from vlmad import deploy
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        out = {{}}
        for backend in ("onnx", "openvino"):
            r = deploy.load({str(folder)!r}, backend).predict_files({[str(f) for f in files]!r})
            out[backend] = {{"scores": r.scores.tolist(), "maps": r.maps.tolist(), "ng": r.anomalous.tolist()}}
        assert not [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pre = Preprocess(64, method.backbone.mean, method.backbone.std)
    images = torch.stack([pre(load_image(f), None)[0] for f in files])  # the datamodule's reading
    with torch.no_grad():
        ref = method(images, ["bottle"] * 3)
    threshold = json.loads((folder / deploy.MANIFEST).read_text())["thresholds"]["image_threshold"]
    for backend, out in got.items():
        np.testing.assert_allclose(out["scores"], ref.pred_score.numpy(), atol=1e-4, rtol=0, err_msg=backend)
        np.testing.assert_allclose(out["maps"], ref.anomaly_map.numpy(), atol=1e-4, rtol=0, err_msg=backend)
        assert out["ng"] == [s > threshold for s in out["scores"]]


def _csv(out: Path) -> list[dict]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def test_predict_backends_write_what_torch_writes(export_variant, tmp_path, tiny4, synthetic_roots):
    variant, folder, _, _ = export_variant("aprilgan_k2")
    bottle = synthetic_roots["mvtec"] / "bottle_syn"
    good, test = bottle / "train" / "good", tmp_path / "inputs"
    test.mkdir()
    for path in sorted(bottle.glob("test/*/*.png")):
        shutil.copy(path, test / f"{path.parent.name}_{path.name}")
    common = ["batch_size=2", "device=cpu", f"input={test}", "threshold.value=0.5", "threshold.pixel_value=0.3"]
    torch_rows = predict(compose("predict", [*_overrides(tiny4, good, variant), *common], tmp_path / "torch"))
    assert len(torch_rows) == 4
    for backend in ("onnx", "openvino"):
        exp_rows = predict(compose("predict", [f"backend={backend}", f"model={folder}", *common], tmp_path / backend))
        assert [r["path"] for r in exp_rows] == [r["path"] for r in torch_rows]
        for a, b in zip(_csv(tmp_path / "torch"), _csv(tmp_path / backend), strict=True):
            assert a["path"] == b["path"] and abs(float(a["score"]) - float(b["score"])) < 1e-4
            assert a["is_anomalous"] == b["is_anomalous"] or abs(float(a["score"]) - 0.5) < 1e-4
        for r in torch_rows:
            for key in ("mask", "overlay"):
                want = np.asarray(Image.open(r[key]), dtype=np.int16)
                got = np.asarray(Image.open(tmp_path / backend / Path(r[key]).name), dtype=np.int16)
                assert got.shape == want.shape and (np.abs(got - want) > 1).mean() < 1e-3  # pixels at the threshold

    # thresholds: the export's own unless one is given; calibration scores normal images with the export
    cfg = compose("predict", ["backend=openvino", f"model={folder}", f"input={test}"], tmp_path / "stored")
    with pytest.raises(PredictError, match="exported without thresholds"):
        predict(cfg)
    cfg = compose(
        "predict",
        ["backend=onnx", f"model={folder}", f"input={test}", f"threshold.calibration.dir={good}"],
        tmp_path / "calib",
    )
    predict(cfg)
    saved = json.loads((tmp_path / "calib" / "threshold.json").read_text())
    assert saved["n_normal_images"] == 2 and saved["method"] == "AprilGAN"  # 4 normal images minus 2 references


def test_transductive_methods_are_refused(tiny_backbone):
    from vlmad.methods.aprilgan import AprilGAN
    from vlmad.methods.musc import MuSc

    with pytest.raises(ExportError, match="transductive"):
        export_graph(MuSc(tiny_backbone, feature_layers=[1, 3]), "bottle")
    fused = AprilGAN(tiny_backbone, k_shot=1, feature_layers=[1, 3], image_fusion="transductive_minmax")
    with pytest.raises(ExportError, match="transductive"):
        export_graph(fused, "bottle")


def test_export_errors_are_clear(tmp_path, tiny4, synthetic_roots):
    good = synthetic_roots["mvtec"] / "bottle_syn" / "train" / "good"
    cfg = compose("export", [*_overrides(tiny4, good, "winclip"), "format=tflite"], tmp_path / "a")
    with pytest.raises(ExportError, match="format must be one of"):
        export(cfg)
    cfg = compose("export", [*_overrides(tiny4, good, "winclip"), "method.k_shot=1"], tmp_path / "b")
    with pytest.raises(PredictError, match="references="):
        export(cfg)
    cfg = compose(
        "export", [*_overrides(tiny4, good, "aprilgan"), "method.k_shot=1", f"references={good}"], tmp_path / "c"
    )
    with pytest.raises(VlmadError, match="image_fusion=fixed"):  # the reference's k-shot score is transductive
        export(cfg)
    with pytest.raises(deploy.DeployError, match=r"vlmad_model\.json"):
        deploy.load(tmp_path)
