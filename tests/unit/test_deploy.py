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


def test_clear_errors(tmp_path, image_files):
    with pytest.raises(deploy.DeployError, match=f"cannot read {tmp_path}"):
        deploy.load(tmp_path)
    (tmp_path / deploy.MANIFEST).write_text(
        json.dumps({"preprocess": {}, "files": {"onnx": "model.onnx"}, "inputs": [], "outputs": []})
    )
    with pytest.raises(deploy.DeployError, match=r"has no openvino model.*format=openvino or format=both"):
        deploy.load(tmp_path, "openvino")
    with pytest.raises(deploy.DeployError, match="unknown backend 'tensorrt'"):
        deploy.load(tmp_path, "tensorrt")
    with pytest.raises(deploy.DeployError, match=r"images must be \(B, 3, 8, 8\)"):
        _Fake(None).run(np.zeros((2, 8, 8), np.float32))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        deploy.load_image(broken)
    assert not torch.is_tensor(deploy.preprocess(Image.open(image_files[0]), 8, MEAN, STD))
