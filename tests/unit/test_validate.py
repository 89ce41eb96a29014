"""Up-front data validation: every problem of every category in one DataError, before anything is scored."""

from __future__ import annotations

import csv
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmad.data import AnomalyDataModule, DataError, DataWarning, Folder, MVTec, VisA, generate, validate_data

TINY = dict(image_size=32, n_train=3, n_test_good=1, n_test_defect=2)


@pytest.fixture
def mvtec_copy(tmp_path_factory, tmp_path) -> Path:
    """A fresh copy of a small generated MVTec tree (bottle_syn, carpet_syn, grid_syn, nut_syn), safe to damage."""
    cached = tmp_path_factory.getbasetemp() / "validate_mvtec"
    if not cached.is_dir():
        generate(cached, "mvtec", **TINY)
    return Path(shutil.copytree(cached, tmp_path / "mvtec"))


def _defect_image(root: Path, category: str) -> Path:
    return next(p for p in sorted((root / category / "test").rglob("*.png")) if p.parent.name != "good")


def _mask_of(image: Path) -> Path:
    return image.parents[2] / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"


def test_clean_trees_pass(mvtec_copy, tmp_path):
    visa = generate(tmp_path / "visa", "visa", **TINY)  # class-id masks {0, 1} / {0, 2} are valid VisA masks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnomalyDataModule(MVTec(mvtec_copy), fit_set=VisA(visa)).validate(k_shot=3)


def test_all_problems_of_all_categories_in_one_error(mvtec_copy):
    corrupt = _defect_image(mvtec_copy, "nut_syn")  # the last category: a run would fail only at the end
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated PNG
    wrong_size = _mask_of(_defect_image(mvtec_copy, "carpet_syn"))
    Image.new("L", (20, 32)).save(wrong_size)
    train_dir = mvtec_copy / "bottle_syn" / "train" / "good"
    for extra in sorted(train_dir.iterdir())[1:]:
        extra.unlink()
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        AnomalyDataModule(MVTec(mvtec_copy)).validate(k_shot=2)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert message.startswith("3 data problems found before scoring")
    assert len(message.splitlines()) == 4
    assert f"{corrupt}: cannot read image" in message
    assert f"{wrong_size}: mask is 20x32, image" in message
    assert f"{train_dir}: only 1 normal training images of 'bottle_syn' for k_shot=2" in message
    AnomalyDataModule(MVTec(mvtec_copy, categories=["grid_syn"])).validate(k_shot=2)  # untouched category


def test_listing_is_capped(mvtec_copy):
    images = [p for split in ("train", "test") for p in sorted(mvtec_copy.glob(f"*/{split}/*/*.png"))]
    assert len(images) == 24
    for image in images:
        image.write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        validate_data(MVTec(mvtec_copy), k_shot=1)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("24 data problems")
    assert len(lines) == 22 and lines[-1] == "  ... and 4 more"
    assert len(info.value.problems) == 24


def test_missing_masks_and_train_split_are_reported_together(mvtec_copy):
    masks = [_mask_of(p) for p in sorted((mvtec_copy / "nut_syn" / "test").rglob("*.png")) if p.parent.name != "good"]
    for mask in masks:
        mask.unlink()
    shutil.rmtree(mvtec_copy / "grid_syn" / "train")
    with pytest.raises(DataError) as info:
        validate_data(MVTec(mvtec_copy), k_shot=1)
    message = str(info.value)
    assert all(f"expected {m}" in message for m in masks)
    assert f"split folder not found: {mvtec_copy / 'grid_syn' / 'train'}" in message


def test_non_binary_mask_is_an_error_unless_thresholded(mvtec_copy):
    mask = _mask_of(_defect_image(mvtec_copy, "bottle_syn"))
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(mask)  # soft gradient mask
    with pytest.raises(DataError, match=rf"{mask}: not a binary mask: 31 non-zero values \(8, 16, 24"):
        validate_data(MVTec(mvtec_copy, categories=["bottle_syn"]))
    validate_data(MVTec(mvtec_copy, categories=["bottle_syn"], mask_threshold=128))


def test_empty_mask_of_a_defective_image_warns_once_per_category(mvtec_copy):
    images = [p for p in sorted((mvtec_copy / "carpet_syn" / "test").rglob("*.png")) if p.parent.name != "good"]
    for image in images:
        Image.new("L", (32, 32)).save(_mask_of(image))
    with pytest.warns(DataWarning) as record:
        validate_data(MVTec(mvtec_copy))
    assert len(record) == 1
    text = str(record[0].message)
    assert text.startswith(f"carpet_syn: {len(images)} defective images have an all-zero mask")
    assert str(_mask_of(images[0])) in text


def test_fit_set_is_checked(mvtec_copy, tmp_path):
    visa = generate(tmp_path / "visa", "visa", **TINY)
    with (visa / "split_csv" / "1cls.csv").open() as f:
        rows = list(csv.reader(f))
    anomaly = next(i for i, r in enumerate(rows) if r[2] == "anomaly")
    rows[anomaly][4] = ""  # anomaly row without its mask
    with (visa / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=rf"1cls\.csv line {anomaly + 1}: anomaly row without a mask"):
        AnomalyDataModule(MVTec(mvtec_copy), fit_set=VisA(visa)).validate()


def test_folder_classification_only_anomaly_is_fine(tmp_path):
    rng = np.random.default_rng(0)
    for path in ("w/train/good/a.png", "w/test/good/b.png", "w/test/dent/c.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / path)
    validate_data(Folder(tmp_path), k_shot=1)
