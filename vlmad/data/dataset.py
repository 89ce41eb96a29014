"""Map-style dataset turning Records into preprocessed dict samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmad.data.imageio import load_mask, open_rgb

__all__ = ["AnomalyDataset", "load_image", "load_mask"]
from vlmad.data.records import DataError, Record
from vlmad.data.transforms import Preprocess


def load_image(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB from any PIL mode (rules in ``vlmad.data.imageio``); DataError if unreadable."""
    return open_rgb(path)


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
