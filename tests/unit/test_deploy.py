"""vlmad.deploy without a model: preprocessing equal to the datamodule's, decisions, error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmad import deploy
from vlmad.data import AnomalyDataset, Preprocess, Record

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def image_files(tmp_path):
    """One picture saved as RGB, gray, RGBA (varying alpha), palette, 16-bit gray and JPEG, non-square."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    images = {
        "rgb.png": rgb,
        "gray.png": rgb.convert("L"),
        "rgba.png": rgba,
        "palette.png": rgb.convert("P"),
        "gray16.png": gray16,
        "photo.jpg": rgb,
    }
    for name, img in images.items():
        img.save(tmp_path / name)
    return [tmp_path / name for name in images]


def test_preprocessing_equals_the_datamodule(image_files):
    records = [Record(image=p, mask=None, label=0, category="x", defect_type="good") for p in image_files]
    dataset = AnomalyDataset(records, transform=Preprocess(48, MEAN, STD))
    for i, path in enumerate(image_files):
        want = dataset[i]["image"].numpy()
        got = deploy.preprocess(deploy.load_image(path), 48, MEAN, STD)
        assert got.dtype == np.float32 and got.shape == (3, 48, 48)
        np.testing.assert_array_equal(got, want, err_msg=path.name)  # bit-identical, not just close
    modes = {p.name: Image.open(p).mode for p in image_files}
    assert [modes[n] for n in ("gray.png", "rgba.png", "palette.png", "gray16.png")] == ["L", "RGBA", "P", "I;16"]
    # the datamodule also reads an in-memory PIL image of another mode the same way
    rgba = Image.open(image_files[2])
    np.testing.assert_array_equal(
        deploy.preprocess(rgba, 48, MEAN, STD), Preprocess(48, MEAN, STD)(rgba, None)[0].numpy()
    )


class _Fake(deploy.DeployedModel):
    """A DeployedModel whose graph is a fixed function (no model file): score = mean pixel, map = channel 0."""

    def __init__(self, thresholds, use="score"):
        self.image_size, self.mean, self.std = 8, MEAN, STD
        self.thresholds, self.threshold_use, self.info = thresholds, use, {}
        self._run = lambda x: (x.mean(axis=(1, 2, 3)), x[:, 0])


def test_decisions_at_the_stored_thresholds():
    images = np.stack([np.full((3, 8, 8), v, np.float32) for v in (-1.0, 0.2, 2.0)])
    images[0, 0, 0, 0] = 5.0  # a single hot pixel in an otherwise low image
    scores, maps = _Fake(None).run(images)
    assert _Fake(None).decide(scores, maps) == (None, None)
    ng, masks = _Fake({"image_threshold": 0.5, "pixel_threshold": 1.0}).decide(scores, maps)
    assert ng.tolist() == [False, False, True] and masks.sum(axis=(1, 2)).tolist() == [1, 0, 64]
    ng, _ = _Fake({"image_threshold": 0.5, "pixel_threshold": 1.0}, use="pixel").decide(scores, maps)
    assert ng.tolist() == [True, False, True]  # use=pixel: the hot pixel makes image 0 NG
    cal = deploy.calibrate(_Fake(None), [images[:2], images[2:]], quantile=0.5)
    assert cal["n_normal_images"] == 3 and cal["image_threshold"] == pytest.approx(float(scores[1]))


def _tiny_graph(path, size: int, scale: float = 1.0) -> None:
    """An ONNX file with the export's interface: score = scale * mean of the image, map = scale * channel mean."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [scale])),
        helper.make_node("Mul", ["images", "k"], ["scaled"]),
        helper.make_node("ReduceMean", ["scaled"], ["pred_score"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("ReduceMean", ["scaled"], ["anomaly_map"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", size, size]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _tiny_export(folder, size: int = 16, thresholds=None, scale: float = 1.0):
    """An export folder (ONNX + OpenVINO) of the tiny graph, written as ``vlmad export`` writes its manifest."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    _tiny_graph(folder / "model.onnx", size, scale)
    model = ov.Core().read_model(str(folder / "model.onnx"))  # ~20x faster than convert_model for this graph
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    info = {**deploy.basic_manifest(size, MEAN, STD), "files": {"onnx": "model.onnx", "openvino": "model.xml"}}
    info["thresholds"] = thresholds
    deploy.write_manifest(folder, info)
    return folder


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """Two export folders of the tiny graph (scale 1 and 3), made once: OpenVINO's conversion takes seconds."""
    base = tmp_path_factory.mktemp("tiny_exports")
    return {scale: _tiny_export(base / f"x{scale:g}", scale=scale) for scale in (1.0, 3.0)}


def _copy(tiny_exports, folder, scale: float = 1.0, thresholds=None):
    """A copy of a tiny export (to edit) with ``thresholds`` stored in its manifest."""
    import shutil

    shutil.copytree(tiny_exports[scale], folder)
    _edit_manifest(folder, lambda info: info.update(thresholds=thresholds), reseal=True)
    return folder


@pytest.fixture
def tiny_export(tiny_exports, tmp_path):
    return _copy(tiny_exports, tmp_path / "export", thresholds={"image_threshold": 0.0, "pixel_threshold": 0.0})


def _edit_manifest(folder, edit, reseal: bool = False) -> None:
    info = json.loads((folder / deploy.MANIFEST).read_text())
    edit(info)
    if reseal:
        deploy.write_manifest(folder, info)
    else:
        (folder / deploy.MANIFEST).write_text(json.dumps(info))


def test_predict_files_raises_only_deploy_errors_and_takes_an_empty_list(tiny_export, image_files, tmp_path):
    model = deploy.load(tiny_export)
    empty = model.predict_files([])
    assert empty.scores.shape == (0,) and empty.maps.shape == (0, 16, 16)
    assert empty.anomalous.shape == (0,) and empty.masks.shape == (0, 16, 16)
    assert model.predict_files([], map_size="image").maps == []
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not an image")
    for bad in (broken, tmp_path / "missing.png"):
        with pytest.raises(deploy.DeployError, match=f"cannot read image {bad}"):
            model.predict_files([image_files[0], bad])
    with pytest.raises(deploy.DeployError, match="map_size must be one of"):
        model.predict_files(image_files, map_size="full")
    with pytest.raises(deploy.DeployError, match="batch_size must be a positive integer"):
        model.predict_files(image_files, batch_size=0)


def test_long_lists_run_in_bounded_batches_and_maps_come_at_the_image_size(tiny_export, image_files):
    import torch.nn.functional as F

    model = deploy.load(tiny_export, batch_size=4)
    calls = []
    run = model._run
    model._run = lambda x: (calls.append(len(x)), run(x))[1]
    files = image_files * 2  # 12 files
    whole = model.predict_files(files)
    assert calls == [4, 4, 4] and whole.scores.shape == (12,)
    calls.clear()
    native = model.predict_files(files, batch_size=5, map_size="image")
    assert calls == [5, 5, 2]
    np.testing.assert_array_equal(native.scores, whole.scores)
    assert native.sizes == [(37, 53)] * 12
    for small, big, mask in zip(whole.maps, native.maps, native.masks, strict=True):
        assert big.shape == (37, 53) and mask.dtype == bool and mask.shape == (37, 53)
        want = F.interpolate(torch.from_numpy(small)[None, None], size=(37, 53), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(big, want[0, 0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(mask, big > 0.0)


@pytest.mark.parametrize("size", [(5, 7), (37, 53), (64, 16), (16, 16)])
def test_resize_map_equals_torch_bilinear(size):
    import torch.nn.functional as F

    values = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(values)[None, None], size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(deploy.resize_map(values, size), want[0, 0].numpy(), atol=1e-5, rtol=0)


def test_a_model_file_from_another_export_is_refused(tiny_exports, tmp_path, image_files):
    import shutil

    first = _copy(tiny_exports, tmp_path / "first")
    other = tiny_exports[3.0]  # same interface, other numbers
    assert deploy.load(first).predict_files(image_files[:1]).scores.shape == (1,)
    shutil.copy(other / "model.onnx", first / "model.onnx")
    with pytest.raises(deploy.DeployError, match=r"model\.onnx is not the file this export wrote"):
        deploy.load(first, "onnx")
    shutil.copy(other / "model.bin", first / "model.bin")  # OpenVINO's weights file is checked too
    with pytest.raises(deploy.DeployError, match=r"model\.bin is not the file this export wrote"):
        deploy.load(first, "openvino")
    (first / "model.xml").unlink()
    with pytest.raises(deploy.DeployError, match=r"model\.xml is missing"):
        deploy.load(first, "openvino")


def test_a_tampered_manifest_is_refused_one_line_per_problem(tiny_exports, tmp_path):
    folder = _copy(tiny_exports, tmp_path / "e", thresholds={"image_threshold": 0.5, "pixel_threshold": 0.5})

    def strings(info):
        info["preprocess"]["image_size"] = "16"
        info["thresholds"]["image_threshold"] = "0.5"
        info["preprocess"]["std"] = [0.2, 0.0, 0.2]

    _edit_manifest(folder, strings)
    with pytest.raises(deploy.DeployError) as err:
        deploy.load(folder)
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and all(line.startswith(str(folder / deploy.MANIFEST)) for line in lines)
    assert "image_size must be an integer in 16..4096, got '16'" in lines[0]
    assert "std must be 3 numbers > 0" in lines[1] and "thresholds must be null or hold finite numbers" in lines[2]
    assert "manifest_sha256 does not match" in lines[3]

    folder = _copy(tiny_exports, tmp_path / "f")
    _edit_manifest(folder, lambda info: info["preprocess"].update(mean=[0.5, 0.5, 0.5]))  # valid, but not exported
    with pytest.raises(deploy.DeployError, match="manifest_sha256 does not match") as err:
        deploy.load(folder)
    assert len(str(err.value).splitlines()) == 1

    def smaller(info):  # consistent in itself, resealed, but not the graph's size
        info.update(deploy.basic_manifest(32, MEAN, STD), files=info["files"])

    _edit_manifest(folder, smaller, reseal=True)
    for backend in deploy.BACKENDS:
        with pytest.raises(deploy.DeployError, match=r"takes input \[.*3, 16, 16\].*image_size 32"):
            deploy.load(folder, backend)


def test_openvino_picks_its_device(tiny_export, image_files):
    cpu = deploy.load(tiny_export, "openvino").predict_files(image_files)
    auto = deploy.load(tiny_export, "openvino", device="AUTO")
    assert auto.device == "AUTO"
    np.testing.assert_allclose(auto.predict_files(image_files).maps, cpu.maps, atol=1e-6)
    with pytest.raises(deploy.DeployError, match=r"OpenVINO has no device 'TPU' here \(available: .*CPU"):
        deploy.load(tiny_export, "openvino", device="TPU")
    with pytest.raises(deploy.DeployError, match="onnxruntime cannot run on device 'TPU'"):
        deploy.load(tiny_export, "onnx", device="TPU")


def test_evaluation_tables_get_the_mode_of_every_other_output(tmp_path):
    import os

    from vlmad.outputs.predictions import write_predictions, write_thresholds

    old = os.umask(0o022)
    try:
        write_predictions(tmp_path / "predictions.csv", [{"path": "a.png", "image_score": 0.5}])
        write_thresholds(tmp_path / "thresholds.json", {"bottle": {"image_threshold": 0.5}})
        (tmp_path / "metrics.csv").write_text("x\n")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"predictions.csv": "0o644", "thresholds.json": "0o644", "metrics.csv": "0o644"}


def test_clear_errors(tiny_exports, tmp_path, image_files):
    with pytest.raises(deploy.DeployError, match=f"cannot read {tmp_path}"):
        deploy.load(tmp_path)
    folder = _copy(tiny_exports, tmp_path / "onnx_only")
    (folder / "model.xml").unlink()
    _edit_manifest(folder, lambda info: info["files"].pop("openvino"), reseal=True)
    with pytest.raises(deploy.DeployError, match=r"has no openvino model.*format=openvino or format=both"):
        deploy.load(folder, "openvino")
    with pytest.raises(deploy.DeployError, match="unknown backend 'tensorrt'"):
        deploy.load(folder, "tensorrt")
    with pytest.raises(deploy.DeployError, match=r"images must be \(B, 3, 8, 8\)"):
        _Fake(None).run(np.zeros((2, 8, 8), np.float32))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        deploy.load_image(broken)
    assert not torch.is_tensor(deploy.preprocess(Image.open(image_files[0]), 8, MEAN, STD))
