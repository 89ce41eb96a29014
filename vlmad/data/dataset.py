"""Map-style dataset turning Records into preprocessed dict samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmad.data.imageio import SIXTEEN_BIT_MODES, open_rgb, scale_float, scale_int
from vlmad.data.records import DataError, Record
from vlmad.data.transforms import Preprocess

# Largest value accepted as a class id in a multi-valued mask (VisA); soft or lossy 0/255 masks exceed it.
CLASS_ID_MAX = 127


def load_image(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB from any PIL mode (rules in ``vlmad.data.imageio``); DataError if unreadable."""
    return open_rgb(path)


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
    if threshold is not None:
        if mode in (*SIXTEEN_BIT_MODES, "I"):
            arr = scale_int(arr, mode)
        elif mode == "F":
            arr = scale_float(arr)
        return arr >= threshold
    problem = mask_problem(np.unique(arr), class_ids)
    if problem is not None:
        raise DataError(f"mask {path}: {problem}")
    return arr != 0


class AnomalyDataset(torch.utils.data.Dataset):
    """Records -> dict samples ready for ``default_collate``.

    Sample keys: ``image`` (3, S, S) float32; ``mask`` (S, S) float32 in {0, 1}; ``label`` int;
    ``category``, ``class_name`` (prompt name), ``defect_type``, ``path`` str; ``has_mask`` bool (False
    for an anomalous image without a mask, which must be left out of pixel metrics); ``orig_size``
    (2,) int64 = (H, W) of the original image.

    Args:
        records: indexed images.
        transform: preprocessing applied to every sample.
        mask_threshold: binarise masks with ``>= threshold`` (8-bit scale) instead of requiring binary masks.
        class_id_masks: accept multi-valued class-id masks (VisA); see ``load_mask``.
        class_names: prompt name per category; identity for categories not in it.
    """

    def __init__(
        self,
        records: list[Record],
        transform: Preprocess,
        mask_threshold: int | None = None,
        class_id_masks: bool = False,
        class_names: dict[str, str] | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.mask_threshold = mask_threshold
        self.class_id_masks = class_id_masks
        self.class_names = dict(class_names or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        image = load_image(rec.image)
        mask = None
        if rec.mask is not None:
            mask = load_mask(rec.mask, self.mask_threshold, self.class_id_masks)
            if mask.shape != (image.height, image.width):
                raise DataError(
                    f"mask {rec.mask} is {mask.shape[1]}x{mask.shape[0]} but image {rec.image} is "
                    f"{image.width}x{image.height} (WxH)"
                )
        pixels, mask_t = self.transform(image, mask)
        return {
            "image": pixels,
            "mask": mask_t,
            "label": rec.label,
            "category": rec.category,
            "class_name": self.class_names.get(rec.category, rec.category),
            "defect_type": rec.defect_type,
            "path": str(rec.image),
            "has_mask": rec.mask is not None or rec.label == 0,
            "orig_size": torch.tensor([image.height, image.width], dtype=torch.int64),
        }
