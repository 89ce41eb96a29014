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
    "visualad": ["method=visualad", "method.feature_layers=[1,3]"],  # the learned tokens: constants of the graph
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
            assert a["path"] == b["path"] and abs(float(a["image_score"]) - float(b["image_score"])) < 1e-4
            assert a["decision"] == b["decision"] or abs(float(a["image_score"]) - 0.5) < 1e-4
        for r in torch_rows:
            for key in ("mask", "overlay"):
                want = np.asarray(Image.open(r[key]), dtype=np.int16)
                got = Image.open(tmp_path / backend / Path(r[key]).relative_to(tmp_path / "torch"))
                got = np.asarray(got, dtype=np.int16)
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


def _no_torch_site(tmp_path: Path) -> Path:
    """A folder of links to only the distributions the runtime recipe installs (and what they require)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    site = tmp_path / "runtime_site"
    site.mkdir()
    todo, seen = ["numpy", "pillow", "onnxruntime", "openvino", "hydra-core", "omegaconf"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        root = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {".."}:
            if not (site / top).exists() and (root / top).exists():
                (site / top).symlink_to(root / top)
    assert not seen & {"torch", "torchvision", "lightning", "open-clip-torch"}, seen
    return site


def test_runtime_recipe_in_a_fresh_venv_without_torch(export_variant, tmp_path, synthetic_roots):
    """README's inspection-box recipe: the wheel with --no-deps, numpy, Pillow, onnxruntime / openvino, hydra-core.

    The venv sees only those distributions (links, so nothing downloads); torch is not importable there, and
    ``vlmad predict backend=onnx`` and ``deploy.load(..., "openvino")`` run.
    """
    import sysconfig

    _, folder, _, _ = export_variant("winclip")
    root = Path(__file__).parents[2]
    src = tmp_path / "src"  # build from a copy: the checkout gets no build/ folder
    for name in ("vlmad", "conf"):
        shutil.copytree(root / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}

    def run(*cmd, cwd=tmp_path):
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    pip = [sys.executable, "-m", "pip"]
    run(*pip, "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    assert purelib != Path(sysconfig.get_paths()["purelib"])
    (purelib / "_vlmad_runtime_deps.pth").write_text(f"{_no_torch_site(tmp_path)}\n")
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", next((tmp_path / "dist").glob("*.whl")))

    probe = subprocess.run([python, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((synthetic_roots["mvtec"] / "bottle_syn" / "test").glob("*/*.png"))[:2]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    run(venv / "bin" / "vlmad", "predict", "backend=onnx", f"model={folder}", f"input={images}", "threshold.value=0.5")
    (run_dir,) = (tmp_path / "outputs" / "predict").iterdir()
    assert len(_csv(run_dir)) == 2 and (run_dir / "report.html").exists()
    script = (
        f"from vlmad import deploy; print(deploy.load({str(folder)!r}, 'openvino').predict_files({str(images)!r} and "
    )
    script += f"sorted(__import__('pathlib').Path({str(images)!r}).iterdir())).scores.shape)"
    assert run(python, "-c", script).stdout.strip() == "(2,)"


def test_predict_with_an_export_never_imports_torch_and_names_its_folder(export_variant, tmp_path, synthetic_roots):
    _, folder, _, _ = export_variant("anomalyclip")
    images = sorted((synthetic_roots["mvtec"] / "bottle_syn" / "test").glob("*/*.png"))[:2]
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "lightning", "open_clip"):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, NoTorch())
        sys.argv = ["predict", "backend=openvino", "model={folder}", "input={images[0].parent}", "threshold.value=0.5"]
        from vlmad.deploy.predict import main
        main()
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "lightning", "open_clip")]
        print("torch-free")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "torch-free" in proc.stdout, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "predict").iterdir()
    assert run_dir.name.endswith(f"_anomalyclip-{TINY4}-openvino")  # the export's method, not the default winclip
    assert f"predict: {len(list(images[0].parent.glob('*.png')))} images from" in (run_dir / "predict.log").read_text()
    assert (run_dir / "report.html").exists() and (run_dir / "heatmaps" / "bottle").is_dir()


def test_export_writes_only_its_own_folder_and_a_failed_export_changes_nothing(
    export_variant, tmp_path, tiny4, synthetic_roots, monkeypatch
):
    import lightning as L

    import vlmad.deploy.export as ex
    from vlmad.engine.module import AnomalyModule

    good = synthetic_roots["mvtec"] / "bottle_syn" / "train" / "good"
    base = _overrides(tiny4, good, "winclip")
    training = tmp_path / "training_run"  # a checkpoint in a training run's folder
    training.mkdir()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.strategy.connect(AnomalyModule(build_method(compose("export", base, tmp_path / "c"))[0]))
    trainer.save_checkpoint(training / "last.ckpt")
    target = tmp_path / "exports" / "bottle"
    shutil.copytree(export_variant("winclip")[1], target)  # an earlier export there: ONNX + OpenVINO
    calibrate = [f"threshold.calibration.dir={good}", "threshold.calibration.quantile=0.5"]
    cfg = compose(
        "export", [*base, *calibrate, f"ckpt_path={training / 'last.ckpt'}", f"output_dir={target}"], tmp_path / "r"
    )
    assert export(cfg) == target
    assert [p.name for p in training.iterdir()] == ["last.ckpt"]  # no last.ckpt.threshold.json beside it
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx", "vlmad_model.json"]  # replaced whole
    assert [p.name for p in target.parent.iterdir()] == ["bottle"]  # no staging folder left
    info = deploy.read_manifest(target)
    assert info["sha256"]["model.onnx"] == deploy.sha256_file(target / "model.onnx")
    assert info["thresholds"]["quantile"] == 0.5
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(graph, path, *args):  # half a model file written, then the disk is full
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "export_onnx", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(compose("export", [*base, "format=both", f"output_dir={target}"], tmp_path / "r2"))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the earlier export, untouched
    assert [p.name for p in target.parent.iterdir()] == ["bottle"]
    deploy.load(target)  # and still loads

    fresh = tmp_path / "new" / "deeper" / "bottle"
    with pytest.raises(OSError, match="No space left"):
        export(compose("export", [*base, f"output_dir={fresh}"], tmp_path / "r3"))
    assert not (tmp_path / "new").exists()  # no empty folder left behind

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an export folder"):
        export(compose("export", [*base, f"output_dir={tmp_path / 'notes'}"], tmp_path / "r4"))


def test_a_model_file_copied_from_another_export_is_refused(export_variant, tmp_path):
    _, winclip, _, _ = export_variant("winclip")
    _, anomalyclip, _, _ = export_variant("anomalyclip")
    mixed = tmp_path / "mixed"
    shutil.copytree(winclip, mixed)
    shutil.copy(anomalyclip / "model.onnx", mixed / "model.onnx")
    with pytest.raises(deploy.DeployError, match=r"model\.onnx is not the file this export wrote"):
        deploy.load(mixed, "onnx")
    deploy.load(mixed, "openvino")  # its own files are intact
