"""vlmad.data.imageio: every PIL mode a camera or data set produces read as the right 8-bit RGB picture."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmad.data import DataError, load_image
from vlmad.data.imageio import ImageReadError, open_rgb, to_rgb


def _rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def _gray(values: list[int]) -> np.ndarray:
    """Expected (1, N, 3) RGB of a row of gray values."""
    return np.repeat(np.array(values, np.uint8)[None, :, None], 3, axis=2)


def test_8bit_gray_and_bilevel():
    assert np.array_equal(_rgb(Image.fromarray(np.array([[0, 7, 128, 255]], np.uint8))), _gray([0, 7, 128, 255]))
    assert np.array_equal(_rgb(Image.fromarray(np.array([[0, 1]], np.uint8) * 255).convert("1")), _gray([0, 255]))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_gray_full_range(mode):
    raw = np.array([[0, 257 * 10, 1000, 65535]])
    dtype = "<u2" if mode == "I;16" else ">u2"
    image = Image.frombytes(mode, (4, 1), raw.astype(dtype).tobytes())
    assert image.mode == mode
    # round(v / 257): 1000 / 257 = 3.89 -> 4; PIL's own convert gives 255 for every non-zero pixel.
    assert np.array_equal(_rgb(image), _gray([0, 10, 4, 255]))


def test_16bit_png_reads_as_the_8bit_picture(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "8.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    assert np.array_equal(np.asarray(load_image(tmp_path / "16.png")), np.asarray(load_image(tmp_path / "8.png")))
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "16.png"))[..., 0], picture)


def test_gray_alpha_drops_alpha():
    image = Image.fromarray(np.array([[[40, 0], [90, 255]]], np.uint8), mode="LA")
    assert np.array_equal(_rgb(image), _gray([40, 90]))
    premultiplied = Image.new("La", (1, 1), (50, 128))  # stored 50 = 100 * 128 / 255
    assert abs(int(_rgb(premultiplied)[0, 0, 0]) - 100) <= 1


def test_rgb_and_rgba_drop_alpha_like_pil():
    pixels = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], np.uint8)
    rgba = Image.fromarray(pixels, mode="RGBA")
    assert np.array_equal(_rgb(rgba), pixels[..., :3])  # fully transparent pixel keeps its colour
    assert np.array_equal(_rgb(rgba), np.asarray(rgba.convert("RGB")))
    rgb = Image.fromarray(pixels[..., :3])
    assert to_rgb(rgb) is rgb


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    expected = np.array([[[10, 20, 30], [200, 100, 50]]], np.uint8)
    assert np.array_equal(_rgb(palette), expected)
    palette.info["transparency"] = 1
    assert np.array_equal(_rgb(palette), expected)
    assert np.array_equal(_rgb(palette.convert("PA")), expected)


def test_cmyk():
    cmyk = np.array([[[0, 0, 0, 0], [0, 0, 0, 128], [200, 0, 100, 50]]], np.uint8)
    image = Image.frombytes("CMYK", (3, 1), cmyk.tobytes())
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    expected = np.rint((255 - c) * (255 - k) / 255)  # 255 (1 - C)(1 - K)
    assert np.abs(_rgb(image).astype(int) - expected).max() <= 1
    assert _rgb(image)[0, 0].tolist() == [255, 255, 255]


def test_32bit_int_as_16bit_range():
    image = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.int32))
    assert image.mode == "I"
    assert np.array_equal(_rgb(image), _gray([0, 100, 255]))
    for bad in (-1, 70000):
        with pytest.raises(ImageReadError, match="outside the 16-bit range"):
            to_rgb(Image.fromarray(np.array([[0, bad]], np.int32)))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # max <= 1: [0, 1]
        ([0.0, 100.4, 255.0], [0, 100, 255]),  # max <= 255: 0..255
        ([0.0, 25700.0, 65535.0], [0, 100, 255]),  # max <= 65535: 16-bit
    ],
)
def test_float_range_rule(values, expected):
    image = Image.fromarray(np.array([values], np.float32))
    assert image.mode == "F"
    assert np.array_equal(_rgb(image), _gray(expected))


@pytest.mark.parametrize("bad", [-0.5, np.nan, 1e6])
def test_float_without_a_rule_raises(bad):
    with pytest.raises(ImageReadError, match="mode F"):
        to_rgb(Image.fromarray(np.array([[0.0, bad]], np.float32)))


def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png"):
        open_rgb(path)
    Image.fromarray(np.array([[0.0, -3.0]], np.float32)).save(tmp_path / "neg.tif")
    with pytest.raises(DataError, match=r"neg\.tif.*mode F"):
        load_image(tmp_path / "neg.tif")


def test_imageio_is_torch_free():
    code = "import sys, vlmad.data.imageio; sys.exit(int(any(m in sys.modules for m in ('torch', 'lightning'))))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
