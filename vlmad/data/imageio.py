"""Torch-free image and mask reading: any PIL mode to 8-bit RGB, strict mask binarisation (numpy + PIL only).

Shared with the torch-free deploy runtime.

Scaling rules (one per kind of pixel data, the same for every image of a data set):

- 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``): PIL's
  ``convert("RGB")``.
- Alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, palette transparency): **dropped**; the colour is
  kept as stored, which is what PIL's ``convert("RGB")`` does for RGBA and what the reference
  implementations get from it. Premultiplied modes (``La``, ``RGBa``) are un-premultiplied first.
- 16-bit gray (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): full range, ``round(v / 257)``, so 0..65535
  maps to 0..255 and a 16-bit save of an 8-bit picture (``v * 257``) reads back exactly. PIL's own
  ``convert`` clips at 255 instead, which turns a 16-bit PNG all white.
- 32-bit int (``I``): taken as 16-bit data (Pillow stores 16-bit PNG/TIFF/PGM data as ``I`` after
  ``convert("I")`` and in older versions), the same ``round(v / 257)``; values outside 0..65535 have
  no standard scaling and raise.
- 32-bit float (``F``): the range is decided by the image maximum: max <= 1 -> [0, 1] (``v * 255``);
  max <= 255 -> 0..255; max <= 65535 -> 0..65535 (``v / 257``); all rounded. Negative, non-finite or
  larger values raise (such data was normalised elsewhere and no rule would restore the picture).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmad.data.records import DataError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Largest value accepted as a class id in a multi-valued mask (VisA); soft or lossy 0/255 masks exceed it.
CLASS_ID_MAX = 127
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


class ImageReadError(DataError):
    """An image that cannot be read or has no defined 8-bit rendering (message names the problem)."""


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """(H, W) uint8 -> RGB image."""
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


def scale_int(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit range (0..65535) -> uint8 by ``round(v / 257)``; (H, W) any int dtype -> (H, W) uint8."""
    values = values.astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ImageReadError(f"mode {mode} image has values {low}..{high}, outside the 16-bit range 0..65535")
    # (v + 128) // 257 == round(v / 257) for 0 <= v <= 65535 (no exact .5 cases since 257 is odd).
    return ((values + 128) // 257).astype(np.uint8)


def scale_float(values: np.ndarray) -> np.ndarray:
    """Float image -> uint8 by the range rule in the module docstring; (H, W) -> (H, W) uint8."""
    if not np.isfinite(values).all():
        raise ImageReadError("mode F image has non-finite values (NaN or inf)")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 65535:
        raise ImageReadError(f"mode F image has values {low:.4g}..{high:.4g}: no rule maps them to 0..255")
    scale = 255.0 if high <= 1.0 else 1.0 if high <= 255.0 else 1.0 / 257.0
    return np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB (rules in the module docstring).

    Args:
        image: PIL image, any mode.

    Returns:
        RGB image of the same size (H, W).

    Raises:
        ImageReadError: values with no defined 8-bit rendering, or a mode PIL cannot convert.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(scale_int(np.asarray(image), mode))
    if mode == "F":
        return _gray_to_rgb(scale_float(np.asarray(image, dtype=np.float32)))
    if mode in PREMULTIPLIED:
        image = image.convert(PREMULTIPLIED[mode])
    try:
        # P with a transparency key, PA, LA, RGBA: convert("RGB") drops alpha and keeps the stored colour.
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageReadError(f"cannot convert mode {mode} to RGB: {err}") from err


def open_rgb(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB (first frame of multi-frame files).

    Args:
        path: image file.

    Returns:
        RGB image, fully decoded (the file is closed).

    Raises:
        ImageReadError: unreadable file or unconvertible pixel data; the message names ``path``.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except ImageReadError as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def distinct_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an array (a counting pass for uint8, ~3x faster than ``np.unique`` on masks)."""
    if arr.dtype == np.uint8:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).astype(np.uint8)
    return np.unique(arr)


def mask_problem(values: np.ndarray, class_ids: bool = False) -> str | None:
    """Why a mask's distinct values are not a binary (or class-id) mask, or None if they are.

    Args:
        values: sorted distinct values of the mask, e.g. ``np.unique(mask)``.
        class_ids: accept several non-zero values up to ``CLASS_ID_MAX`` (VisA masks hold class ids).
    """
    foreground = values[values != 0]
    if foreground.size <= 1 or (class_ids and foreground.max() <= CLASS_ID_MAX and foreground.min() > 0):
        return None
    shown = ", ".join(f"{v:g}" for v in foreground[:6].tolist()) + (", ..." if foreground.size > 6 else "")
    expected = "0 and one value (0/255 or 0/1)" + (f" or class ids 1..{CLASS_ID_MAX}" if class_ids else "")
    return (
        f"not a binary mask: {foreground.size} non-zero values ({shown}), expected {expected}; "
        "set the data set's mask_threshold (e.g. 128) to binarise a soft or lossy mask"
    )


def read_mask_values(path: Path) -> tuple[np.ndarray, str]:
    """Raw mask pixels (H, W) (colour channels merged by max, alpha dropped) and PIL mode; DataError if unreadable."""
    try:
        with Image.open(path) as img:
            mode, arr = img.mode, np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from err
    if arr.ndim == 3:
        arr = (arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]).max(-1)
    return arr, mode


def load_mask(path: Path, threshold: int | None = None, class_ids: bool = False) -> np.ndarray:
    """Load a mask as (H, W) bool.

    Without ``threshold`` the mask must be binary (0 and one foreground value: MVTec's 0/255, 0/1, ...)
    or, with ``class_ids``, hold small class ids (VisA); any non-zero pixel is anomalous. Anything else
    (a soft or JPEG-damaged mask, where ``!= 0`` would mark most of the image) raises DataError naming
    the values, unless ``threshold`` is set: then pixels ``>= threshold`` on the 8-bit scale (16-bit and
    float masks scaled as images are) are anomalous.

    Args:
        path: mask file.
        threshold: explicit binarisation threshold in 0..255, or None for the strict check.
        class_ids: accept multi-valued class-id masks (VisA).
    """
    arr, mode = read_mask_values(path)
    try:
        return binarise_mask(arr, mode, threshold, class_ids)
    except DataError as err:
        raise DataError(f"mask {path}: {err}") from None


def binarise_mask(arr: np.ndarray, mode: str, threshold: int | None = None, class_ids: bool = False) -> np.ndarray:
    """Raw mask values (H, W) of PIL ``mode`` -> (H, W) bool, by the rules of ``load_mask``; DataError if not binary."""
    if threshold is not None:
        if mode in (*SIXTEEN_BIT_MODES, "I"):
            arr = scale_int(arr, mode)
        elif mode == "F":
            arr = scale_float(arr)
        return arr >= threshold
    problem = mask_problem(distinct_values(arr), class_ids)
    if problem is not None:
        raise DataError(problem)
    return arr != 0
