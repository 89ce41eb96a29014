"""Map-style dataset turning Records into preprocessed dict samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmad.data.records import DataError, Record
from vlmad.data.transforms import Preprocess

MASK_BINARIZE = ("nonzero", "gt127")


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB (MVTec's grid/screw/zipper are single-channel); DataError if unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def load_mask(path: Path, binarize: str = "nonzero") -> np.ndarray:
    """Load a mask as (H, W) bool.

    ``nonzero`` works for MVTec's 0/255 masks and VisA's class-id masks alike; a multichannel mask
    counts a pixel anomalous if any colour channel is non-zero (alpha ignored).
    """
    try:
        with Image.open(path) as img:
            arr = np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from err
    if arr.ndim == 3:
        arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    binary = arr != 0 if binarize == "nonzero" else arr > 127
    return binary.any(-1) if binary.ndim == 3 else binary


class AnomalyDataset(torch.utils.data.Dataset):
    """Records -> dict samples ready for ``default_collate``.

    Sample keys: ``image`` (3, S, S) float32; ``mask`` (S, S) float32 in {0, 1}; ``label`` int;
    ``category``, ``class_name`` (prompt name), ``defect_type``, ``path`` str; ``has_mask`` bool (False
    for an anomalous image without a mask, which must be left out of pixel metrics); ``orig_size``
    (2,) int64 = (H, W) of the original image.

    Args:
        records: indexed images.
        transform: preprocessing applied to every sample.
        mask_binarize: "nonzero" (default) or "gt127" (for lossy-compressed masks).
        class_names: prompt name per category; identity for categories not in it.
    """

    def __init__(
        self,
        records: list[Record],
        transform: Preprocess,
        mask_binarize: str = "nonzero",
        class_names: dict[str, str] | None = None,
    ) -> None:
        if mask_binarize not in MASK_BINARIZE:
            raise ValueError(f"unknown mask_binarize {mask_binarize!r} (expected one of {MASK_BINARIZE})")
        self.records = list(records)
        self.transform = transform
        self.mask_binarize = mask_binarize
        self.class_names = dict(class_names or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        image = load_image(rec.image)
        mask = None
        if rec.mask is not None:
            mask = load_mask(rec.mask, self.mask_binarize)
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
