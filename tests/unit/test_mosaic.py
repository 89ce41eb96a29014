"""APRIL-GAN's mosaic augmentation and with-replacement reference draws (the reference's MVTec-AD fit / k-shot)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmad.data import AnomalyDataModule, Synthetic
from vlmad.data.mosaic import EpochKeySampler, MosaicDataset


@pytest.fixture
def datamodule(synthetic_roots):
    def make(**kwargs) -> AnomalyDataModule:
        reader = Synthetic(
            root=synthetic_roots["mvtec"],
            categories=["carpet_syn", "bottle_syn"],
            image_size=64,
            n_train=4,
            n_test_good=2,
            n_test_defect=2,
            seed=0,
        )
        # 2x2 tiles of 64 px at 128 px: no resize, every tile mask stays in its quadrant
        return AnomalyDataModule(reader, fit_set=reader, image_size=128, num_workers=0, seed=5, **kwargs)

    return make


def test_no_mosaic_at_probability_zero(datamodule):
    dm = datamodule()
    plain = dm.fit_dataset()
    mosaic = MosaicDataset(plain.datasets, prob=0.0, seed=5)
    for i in range(len(plain)):
        torch.testing.assert_close(mosaic[(i, 3)]["image"], plain[i]["image"])


def test_mosaic_tiles_four_images_of_the_same_category_with_their_masks(datamodule):
    dm = datamodule(mosaic_prob=1.0)
    dataset = dm.fit_dataset()
    assert isinstance(dataset, MosaicDataset) and len(dataset) == 8
    for index in range(len(dataset)):
        sample = dataset[(index, 0)]
        tiles = sample["path"].split("|")
        assert len(tiles) == 4 and sample["defect_type"] == "mosaic"
        category = "carpet_syn" if index < 4 else "bottle_syn"  # tiles come from the sample's own category
        assert sample["category"] == category and all(f"/{category}/" in t for t in tiles)
        defective = ["/good/" not in t for t in tiles]
        mask = sample["mask"].numpy()
        quadrants = [mask[:64, :64], mask[:64, 64:], mask[64:, :64], mask[64:, 64:]]
        for is_defect, quadrant in zip(defective, quadrants, strict=True):
            assert (quadrant.sum() > 0) == is_defect  # each tile's mask lands in its own quadrant
        assert sample["label"] == int(any(defective))


def test_mosaic_draws_depend_only_on_seed_epoch_and_index(datamodule):
    dataset = datamodule(mosaic_prob=0.5).fit_dataset()
    first = [dataset[(i, 1)]["path"] for i in range(8)]
    assert first == [dataset[(i, 1)]["path"] for i in range(8)]  # any process, any worker: the same draw
    assert first != [dataset[(i, 2)]["path"] for i in range(8)]  # another epoch, other mosaics
    n_mosaic = sum("|" in dataset[(i, e)]["path"] for i in range(8) for e in range(25))
    assert 0.35 < n_mosaic / 200 < 0.65


def test_fit_loader_feeds_epoch_keys_when_mosaics_are_on(datamodule):
    dm = datamodule(mosaic_prob=0.2)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochKeySampler)
    loader.sampler.set_epoch(4)
    assert {epoch for _, epoch in loader.sampler} == {4}
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 128, 128)


def test_references_with_replacement_follow_the_reference_draw(datamodule):
    dm = datamodule(references_with_replacement=True)
    _, paths = dm.reference_images("bottle_syn", 4, seed=0)
    normal = sorted(str(r.image) for r in dm.test_set.records("bottle_syn", "train") if r.label == 0)
    assert len(paths) == 4 and set(paths) <= set(normal)
    draws = [tuple(dm.reference_images("bottle_syn", 4, seed=s)[1]) for s in range(20)]
    assert any(len(set(d)) < 4 for d in draws)  # duplicates happen, as with torch.randint
    without = datamodule().reference_images("bottle_syn", 4, seed=0)[1]
    assert len(set(without)) == 4
    assert np.array_equal(dm.reference_images("bottle_syn", 4, seed=0)[1], paths)  # seeded
