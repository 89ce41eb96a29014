"""LightningDataModule: per-category test loaders, a mixed fit loader, few-shot reference images."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Sampler, default_collate

from vlmad.data.dataset import AnomalyDataset, load_image
from vlmad.data.mosaic import EpochKeySampler, MosaicDataset
from vlmad.data.records import DataError, Reader, Record
from vlmad.data.references import ReferenceDraw, shuffle_pick, sorted_slice
from vlmad.data.transforms import Preprocess
from vlmad.data.validate import validate_data

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch); with several devices, this rank's share of it.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees the same
    order in its remaining epochs as an uninterrupted run (a plain generator would restart its stream). With
    ``world_size`` ranks, rank r takes positions r, r + W, ... of the epoch's permutation (padded by wrapping to
    equal lengths, as DistributedSampler does), so the ranks' batches of step t together are the 1-device batch
    of step t at the same global batch size.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of this epoch."""
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.world_size == 1:
            return iter(order)
        order += order[: len(self) * self.world_size - self.n]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


def default_num_workers() -> int:
    """DataLoader workers for ``num_workers: auto``: one core for the main process, at most 8 workers."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def split_categories(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Whole categories per rank, balanced by image count (largest first to the least loaded rank).

    Categories are never split: a DistributedSampler would pad a category by repeating images, which
    changes AUROC and AUPRO. Each rank keeps the categories' original order.
    """
    load, parts = [0] * world_size, [[] for _ in range(world_size)]
    for name in sorted(sizes, key=lambda c: (-sizes[c], list(sizes).index(c))):
        rank = load.index(min(load))
        parts[rank].append(name)
        load[rank] += sizes[name]
    order = list(sizes)
    return [sorted(part, key=order.index) for part in parts]


PADDING_KEY = "padding"  # a test batch holding this key is a rank's padding: nothing to score


class _Padding(torch.utils.data.Dataset):
    """One ``{PADDING_KEY: True}`` sample: a rank's padding test loader (see ``test_dataloader``)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, bool]:
        return {PADDING_KEY: True}


class CachedFeaturesCollate:
    """``default_collate`` plus the batch's feature-cache entries, read in the DataLoader worker.

    Adds ``cache_keys`` (B,) and ``cached_features`` (B,) (an entry dict or None per image); the module primes the
    feature cache with them (``FeatureCache.prime``), which uses an entry only under the key it computes itself.
    """

    def __init__(self, reader: Callable[[Tensor], tuple[str, dict[str, Tensor] | None]]) -> None:
        self.reader = reader

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        keys, entries = zip(*(self.reader(s["image"]) for s in samples), strict=True)
        batch["cache_keys"], batch["cached_features"] = list(keys), list(entries)
        return batch


class AnomalyDataModule(L.LightningDataModule):
    """Data for one run: ``test_set`` is evaluated per category, ``fit_set`` (optional) is fitted on.

    Args:
        test_set: reader (MVTec, VisA, Folder, Synthetic) evaluated on its test split.
        fit_set: auxiliary reader the learnable parts are fitted on; None for zero-/few-shot runs.
        image_size: side S of the preprocessed images (``backbone.image_size``).
        mean: normalisation mean (the backbone's).
        std: normalisation std (the backbone's).
        batch_size: batch size of every loader.
        num_workers: DataLoader workers that decode and resize images; ``auto`` = :func:`default_num_workers`.
        mask_resize: "bilinear_threshold" or "nearest" (see ``Preprocess``).
        resize_mode: "squash" or "shorter_side_crop".
        fit_split: split of ``fit_set`` to fit on; "test" (which has masks), as the published
            cross-dataset protocols do.
        shuffle: shuffle the fit loader.
        augment: optional albumentations transform, applied to the fit set only.
        seed: seed of the fit loader's shuffling; None takes ``torch.initial_seed()`` (set by
            ``seed_everything``).
        mosaic_prob: APRIL-GAN's MVTec-AD fit augmentation (reference ``aug_rate`` 0.2): probability that a fit
            sample becomes a 2x2 mosaic of its category (see ``vlmad.data.mosaic``); 0 = off.
        references_with_replacement: draw few-shot references with replacement (``torch.randint``, duplicates
            possible) as APRIL-GAN's reference does; default without replacement.
        image_resize: ``pil`` or ``torchvision`` image resize (see ``Preprocess``; SubspaceAD's processor is the
            latter).
    """

    def __init__(
        self,
        test_set: Reader,
        fit_set: Reader | None = None,
        image_size: int = 240,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        batch_size: int = 8,
        num_workers: int | str = "auto",
        mask_resize: str = "bilinear_threshold",
        resize_mode: str = "squash",
        fit_split: str = "test",
        shuffle: bool = True,
        augment: Any = None,
        seed: int | None = None,
        mosaic_prob: float = 0.0,
        references_with_replacement: bool = False,
        image_resize: str = "pil",
    ) -> None:
        super().__init__()
        self.test_set = test_set
        self.fit_set = fit_set
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers == "auto" else int(num_workers)
        self.mosaic_prob = float(mosaic_prob)
        self.feature_reader = None  # a cache WorkerReader: disk-cache entries read in the loader workers
        self.references_with_replacement = bool(references_with_replacement)
        self.fit_split = fit_split
        self.shuffle = shuffle
        self.seed = seed
        geometry = (image_size, tuple(mean), tuple(std), mask_resize, resize_mode)
        self.transform = Preprocess(*geometry, image_resize=image_resize)
        self.fit_transform = Preprocess(*geometry, augment, image_resize=image_resize)

    @property
    def all_categories(self) -> list[str]:
        """Every category of ``test_set``, in order."""
        return list(self.test_set.categories)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @property
    def test_categories(self) -> list[str]:
        """This rank's categories in loader order: all of them on one device, whole categories per rank on several."""
        rank, world = self._rank_world()
        if world == 1:
            return self.all_categories
        sizes = {c: len(self.test_set.records(c, "test")) for c in self.all_categories}
        return split_categories(sizes, world)[rank]

    def prompt_name(self, category: str) -> str:
        """Prompt name of a test category."""
        return self.test_set.prompt_name(category)

    def _loader(
        self, dataset: torch.utils.data.Dataset, sampler: Sampler | None = None, fit: bool = False
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=None if self.feature_reader is None else CachedFeaturesCollate(self.feature_reader),
            num_workers=self.num_workers,
            # the fit loader is iterated every epoch; a test loader once (one per category: no idle worker pools)
            persistent_workers=fit and self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def validate(self, k_shot: int = 0) -> None:
        """Check all data of this run up front (cheap header reads, no backbone); see ``validate_data``.

        Args:
            k_shot: few-shot reference images the method draws per test category (0 for zero-shot).

        Raises:
            DataError: one error listing every problem found (file and problem per line).
        """
        validate_data(self.test_set, k_shot, self.fit_set, self.fit_split)

    @staticmethod
    def _dataset(reader: Reader, records: list[Record], transform: Preprocess) -> AnomalyDataset:
        """Records of ``reader`` as a dataset reading masks the reader's way (threshold, class ids)."""
        return AnomalyDataset(
            records,
            transform,
            mask_threshold=reader.mask_threshold,
            class_id_masks=reader.mask_class_ids,
            class_names={c: reader.prompt_name(c) for c in {r.category for r in records}},
        )

    def test_dataset(self, category: str) -> AnomalyDataset:
        """The test split of one ``test_set`` category."""
        return self._dataset(self.test_set, self.test_set.records(category, "test"), self.transform)

    def fit_dataset(self) -> torch.utils.data.Dataset:
        """All ``fit_set`` categories' ``fit_split`` splits, concatenated (with mosaics when ``mosaic_prob`` > 0)."""
        if self.fit_set is None:
            raise DataError("no fit_set configured: this DataModule has nothing to fit on")
        fit_set = self.fit_set
        datasets = [
            self._dataset(fit_set, fit_set.records(c, self.fit_split), self.fit_transform) for c in fit_set.categories
        ]
        if self.mosaic_prob > 0:
            return MosaicDataset(datasets, self.mosaic_prob, self._fit_seed())
        return ConcatDataset(datasets)

    def _fit_seed(self) -> int:
        return torch.initial_seed() if self.seed is None else self.seed

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test category, in ``test_categories`` order, unshuffled.

        On several devices every rank returns the same number of loaders: Lightning runs one collective per test
        loader (its length check), so a rank with fewer categories (an uneven split, or no category at all when
        there are more devices than categories) gets padding loaders of one ``PADDING_KEY`` batch that the module
        skips. Without them the ranks wait on each other forever.
        """
        loaders = [self._loader(self.test_dataset(c)) for c in self.test_categories]
        _, world = self._rank_world()
        if world > 1:
            sizes = {c: len(self.test_set.records(c, "test")) for c in self.all_categories}
            most = max(len(part) for part in split_categories(sizes, world))
            loaders += [DataLoader(_Padding(), batch_size=1) for _ in range(most - len(loaders))]
        return loaders

    def train_dataloader(self) -> DataLoader:
        """Fit loader mixing all ``fit_set`` categories, shuffled by (seed, epoch); this rank's share on several."""
        dataset = self.fit_dataset()
        rank, world = self._rank_world()
        if self.shuffle:
            sampler = EpochShuffleSampler(len(dataset), self._fit_seed(), rank, world)
        else:
            sampler = [i for i in range(len(dataset))][rank::world]
        if isinstance(dataset, MosaicDataset):
            sampler = EpochKeySampler(sampler)  # mosaics drawn by (seed, epoch, index), in any worker
        return self._loader(dataset, sampler, fit=True)

    def reference_images(
        self, category: str, k: int, seed: int, draw: ReferenceDraw | None = None
    ) -> tuple[Tensor, list[str]]:
        """Draw k normal few-shot reference images from the category's ``train`` split, and expand them if asked.

        The default rule (``random``) seeds a generator by ``crc32(category) + seed``, so every category gets its
        own draw and the same (category, seed) always gives the same images (without replacement by default).
        A method's ``draw`` may pick another rule and ask for views of the originals (e.g. rotated copies, made at
        the original resolution, each then preprocessed like a test image; random views use that generator).

        Returns:
            images (k·V, 3, S, S) preprocessed, in the order the views are made (V = 1 without views); the k paths.
        """
        draw = draw or ReferenceDraw()
        normal = [r for r in self.test_set.records(category, "train") if r.label == 0]
        if draw.rule != "random":  # the references sort the file paths
            normal.sort(key=lambda r: str(r.image))
        needed = (seed + 1) * k if draw.rule == "sorted_slice" else k
        if not 0 <= k <= len(normal) or needed > len(normal):
            raise DataError(
                f"cannot draw k={k} reference images for {category!r}"
                + (f" with seed {seed} (images {seed * k}..{needed - 1} of the sorted list)" if needed > k else "")
                + f": only {len(normal)} normal training images in {self.test_set.root}"
            )
        generator = torch.Generator().manual_seed(zlib.crc32(category.encode()) + seed)
        if draw.rule == "sorted_slice":  # AnomalyDINO: sorted(train/good)[seed*k:(seed+1)*k]
            picks = sorted_slice(len(normal), k, seed)
        elif draw.rule == "shuffle":  # SubspaceAD: one seeded Python random stream over the sorted categories
            sizes = {c: sum(r.label == 0 for r in self.test_set.records(c, "train")) for c in self.all_categories}
            picks = shuffle_pick(sizes, category, k, seed)
        elif self.references_with_replacement:  # APRIL-GAN's reference: torch.randint, duplicates possible
            picks = torch.randint(0, len(normal), (k,), generator=generator).tolist() if normal else []
        else:
            picks = torch.randperm(len(normal), generator=generator)[:k].tolist()
        chosen = [normal[i] for i in picks]
        s = self.transform.image_size
        if draw.views is not None:
            originals = [np.asarray(load_image(r.image)) for r in chosen]
            views = draw.views(originals, generator)
            images = [self.transform(Image.fromarray(v), None)[0] for v in views]
        else:
            dataset = self._dataset(self.test_set, chosen, self.transform)
            images = [dataset[i]["image"] for i in range(k)]
        return (torch.stack(images) if images else torch.empty(0, 3, s, s)), [str(r.image) for r in chosen]
