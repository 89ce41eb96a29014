"""Visualisation helpers: shapes, dtypes, ranges and PNG round trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlmad.viz import colorize, denormalize_image, normalize_map, overlay_panel, save_png

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_normalize_map_range():
    amap = torch.linspace(-2, 3, 64).reshape(8, 8)
    out = normalize_map(amap)
    assert out.shape == (8, 8) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    fixed = normalize_map(np.full((4, 4), 0.25), vmin=0.0, vmax=1.0)
    assert np.allclose(fixed, 0.25)
    assert np.all(normalize_map(np.ones((3, 3))) == 0)  # constant map, no division by zero


def test_denormalize_image_inverts_clip_transform():
    rgb = torch.rand(3, 10, 12)
    normalised = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    out = denormalize_image(normalised, CLIP_MEAN, CLIP_STD)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.round(rgb.permute(1, 2, 0).numpy() * 255)).max() <= 1


def test_colorize_is_jet_like():
    out = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    low, mid, high = out[0].astype(int)
    assert low[2] > 100 and low[0] == 0  # dark blue
    assert mid[1] > 200  # green-ish middle
    assert high[0] > 100 and high[2] == 0  # dark red


@pytest.mark.parametrize("with_mask", [True, False])
def test_overlay_panel(with_mask):
    image = np.full((16, 20, 3), 128, dtype=np.uint8)
    amap = np.zeros((16, 20), dtype=np.float32)
    amap[4:8, 4:8] = 1.0
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[4:10, 4:10] = 1
    panel = overlay_panel(image, amap, mask if with_mask else None, alpha=0.5)
    assert panel.shape == (16, 60, 3) and panel.dtype == np.uint8
    assert np.array_equal(panel[:, :20], image)
    assert not np.array_equal(panel[:, 20:40], image)  # heatmap blended
    truth = panel[:, 40:]
    if with_mask:
        assert tuple(truth[4, 4]) == (255, 0, 0)  # outline
        assert np.array_equal(truth[0, 0], image[0, 0])  # outside the mask untouched
    else:
        assert np.array_equal(truth, image)
    with pytest.raises(ValueError, match="same size"):
        overlay_panel(image, np.zeros((8, 8)), None)


def test_save_png_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "panel.png"
    save_png(path, array)
    assert np.array_equal(np.asarray(Image.open(path)), array)
