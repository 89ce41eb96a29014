"""APRIL-GAN's mosaic augmentation for fitting on MVTec-AD (``aug_rate`` 0.2 in the reference's train.py).

With probability ``prob`` a fit sample is replaced by a 2x2 mosaic of four images of the same category's fit
split: each tile takes a defect-type folder uniformly at random (``good`` included), then a file of that folder
uniformly at random, as the reference's ``combine_img`` does; masks are tiled the same way and the mosaic is
preprocessed like any image (squash resize). Draws depend only on (seed, epoch, index), carried by the sampler
in the key, so a resumed run and every DataLoader worker see the same mosaics as an uninterrupted run.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vlmad.data.dataset import AnomalyDataset, load_image, load_mask
from vlmad.data.records import Record


class MosaicDataset(Dataset):
    """The concatenation of per-category fit datasets, with a mosaic in place of a sample with probability ``prob``.

    Args:
        datasets: one AnomalyDataset per category (the fit split).
        prob: probability that a sample is replaced by a mosaic (reference: 0.2 on MVTec-AD, 0 on VisA).
        seed: seed of the draws.
    """

    def __init__(self, datasets: Sequence[AnomalyDataset], prob: float, seed: int) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"mosaic probability must be in [0, 1], got {prob}")
        self.datasets, self.prob, self.seed = list(datasets), float(prob), int(seed)
        self.ends = np.cumsum([len(d) for d in self.datasets]).tolist()
        # defect-type folder -> its records, per category (sorted: the draw must not depend on listing order)
        self.by_type = [self._group(d.records) for d in self.datasets]

    @staticmethod
    def _group(records: list[Record]) -> dict[str, list[Record]]:
        groups: dict[str, list[Record]] = {}
        for rec in sorted(records, key=lambda r: str(r.image)):
            groups.setdefault(rec.defect_type, []).append(rec)
        return dict(sorted(groups.items()))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        part = bisect.bisect_right(self.ends, index)
        dataset = self.datasets[part]
        local = index - (self.ends[part - 1] if part else 0)
        rng = random.Random(f"mosaic:{self.seed}:{epoch}:{index}")  # str seeds hash the same in every process
        if rng.random() >= self.prob:
            return {**dataset[local], "augmented": False}
        tiles = [rng.choice(self.by_type[part][rng.choice(list(self.by_type[part]))]) for _ in range(4)]
        return {**self._mosaic(dataset, tiles), "augmented": True}  # the feature cache leaves these out

    @staticmethod
    def _mosaic(dataset: AnomalyDataset, tiles: list[Record]) -> dict[str, Any]:
        images = [load_image(r.image) for r in tiles]
        masks = [
            load_mask(r.mask, dataset.mask_threshold, dataset.class_id_masks)
            if r.mask is not None
            else np.zeros((im.height, im.width), bool)
            for r, im in zip(tiles, images, strict=True)
        ]
        w, h = images[0].size  # the reference pastes every tile at multiples of the first image's size
        canvas, mask = Image.new("RGB", (2 * w, 2 * h)), Image.new("L", (2 * w, 2 * h))
        for i, (im, m) in enumerate(zip(images, masks, strict=True)):
            corner = ((i % 2) * w, (i // 2) * h)
            canvas.paste(im, corner)
            mask.paste(Image.fromarray(m.astype(np.uint8) * 255), corner)
        pixels, mask_t = dataset.transform(canvas, np.asarray(mask) > 0)
        category = tiles[0].category
        return {
            "image": pixels,
            "mask": mask_t,
            "label": max(r.label for r in tiles),  # the reference keeps the replaced sample's flag (unused by its loss)
            "category": category,
            "class_name": dataset.class_names.get(category, category),
            "defect_type": "mosaic",
            "path": "|".join(str(r.image) for r in tiles),
            "has_mask": True,
            "orig_size": torch.tensor([2 * h, 2 * w], dtype=torch.int64),
        }


class EpochKeySampler(Sampler):
    """Wraps an index sampler with ``set_epoch`` and yields ``(index, epoch)`` keys for :class:`MosaicDataset`."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch (Lightning calls this before every epoch)."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((int(i), self.epoch) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
