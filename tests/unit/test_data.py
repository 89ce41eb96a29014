"""Tests for vlmad.data: synthetic generator, readers, preprocessing, dataset and DataModule."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from vlmad.data import (
    AnomalyDataModule,
    AnomalyDataset,
    DataError,
    Folder,
    MVTec,
    Preprocess,
    Synthetic,
    VisA,
    generate,
    load_image,
    load_mask,
)
from vlmad.data.datamodule import CLIP_MEAN, CLIP_STD

SMALL = dict(image_size=64, n_train=4, n_test_good=2, n_test_defect=4)


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("mvtec"), "mvtec", **SMALL)


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("visa"), "visa", **SMALL)


def _preprocess(size: int = 32, **kwargs) -> Preprocess:
    return Preprocess(size, CLIP_MEAN, CLIP_STD, **kwargs)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --- generator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["mvtec", "visa"])
def test_generate_is_deterministic(tmp_path, layout):
    a = _files(generate(tmp_path / "a", layout, **SMALL))
    b = _files(generate(tmp_path / "b", layout, **SMALL))
    c = _files(generate(tmp_path / "c", layout, **{**SMALL, "seed": 1}))
    assert len(a) > 20
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_generate_mvtec_layout(mvtec_root):
    reader = MVTec(mvtec_root)
    assert reader.categories == ["bottle_syn", "carpet_syn", "grid_syn", "nut_syn"]
    for category in reader.categories:
        cat = mvtec_root / category
        assert len(list((cat / "train" / "good").glob("*.png"))) == 4
        defects = sorted(p.name for p in (cat / "test").iterdir() if p.name != "good")
        assert len(defects) == 2
        for defect in defects:
            for image in (cat / "test" / defect).glob("*.png"):
                mask = np.array(Image.open(cat / "ground_truth" / defect / f"{image.stem}_mask.png"))
                assert set(np.unique(mask)) == {0, 255}
    assert Image.open(mvtec_root / "grid_syn/train/good/000.png").mode == "L"
    assert Image.open(mvtec_root / "carpet_syn/train/good/000.png").mode == "RGB"


def test_generate_visa_layout(visa_root):
    with (visa_root / "split_csv" / "1cls.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["object", "split", "label", "image", "mask"]
    objects = {r[0] for r in rows[1:]}
    assert objects == {"candle_syn", "pcb_syn", "capsules_syn"}
    assert all((visa_root / "candle_syn" / "Data" / "Images" / d).is_dir() for d in ("Normal", "Anomaly"))
    assert (visa_root / "candle_syn" / "image_anno.csv").is_file()
    image = Image.open(visa_root / rows[1][3])
    assert rows[1][3].endswith(".JPG") and image.format == "JPEG"
    assert image.size == (80, 64)  # non-square, width = 1.25 * height
    ids = set()
    for r in rows[1:]:
        if r[2] == "anomaly":
            ids |= set(np.unique(np.array(Image.open(visa_root / r[4]))).tolist())
    assert ids == {0, 1, 2}  # class ids, not 0/255


def test_generate_defects_are_salient(mvtec_root):
    rec = next(r for r in MVTec(mvtec_root).records("bottle_syn", "test") if r.label)
    image = np.asarray(Image.open(rec.image).convert("RGB"), np.float32) / 255
    mask = np.array(Image.open(rec.mask)) > 0
    assert 0 < mask.mean() < 0.2
    assert np.abs(image[mask].mean(0) - image[~mask].mean(0)).sum() > 0.15


def test_generate_skips_when_present_and_redoes_on_change(tmp_path):
    root = generate(tmp_path, "mvtec", ["carpet_syn"], **SMALL)
    stray = root / "carpet_syn" / "train" / "good" / "stray.png"
    shutil.copy(root / "carpet_syn" / "train" / "good" / "000.png", stray)
    generate(tmp_path, "mvtec", ["carpet_syn"], **SMALL)
    assert stray.exists()  # skipped: nothing rewritten
    generate(tmp_path, "mvtec", ["carpet_syn"], **{**SMALL, "n_train": 3})
    assert not stray.exists()
    assert len(list((root / "carpet_syn" / "train" / "good").iterdir())) == 3
    assert json.loads((root / ".vlmad_synthetic.json").read_text())["n_train"] == 3


# --- readers -------------------------------------------------------------------------------------


def test_mvtec_counts_and_labels(mvtec_root):
    reader = MVTec(mvtec_root)
    train = reader.records("carpet_syn", "train")
    test = reader.records("carpet_syn", "test")
    assert len(train) == 4 and {r.label for r in train} == {0}
    assert sum(r.label == 0 for r in test) == 2 and sum(r.label == 1 for r in test) == 4
    for r in test:
        assert (r.defect_type == "good") == (r.label == 0) == (r.mask is None)
        if r.mask is not None:
            assert r.mask == mvtec_root / "carpet_syn/ground_truth" / r.defect_type / f"{r.image.stem}_mask.png"


def test_mvtec_mask_derived_from_image_path_not_sort_order(tmp_path):
    root = generate(tmp_path, "mvtec", ["carpet_syn"], **SMALL)
    defect = next(p for p in (root / "carpet_syn" / "test").iterdir() if p.name != "good")
    gt = root / "carpet_syn" / "ground_truth" / defect.name
    # Images "a" < "a0" but masks "a0_mask" < "a_mask": pairing by sorted position would swap them.
    for old, new in (("000", "a"), ("001", "a0")):
        (defect / f"{old}.png").rename(defect / f"{new}.png")
        (gt / f"{old}_mask.png").rename(gt / f"{new}_mask.png")
    recs = [r for r in MVTec(root).records("carpet_syn", "test") if r.defect_type == defect.name]
    masks_sorted = sorted(p for p in gt.iterdir())
    assert [r.mask for r in recs] != masks_sorted
    assert all(r.mask.name == f"{r.image.stem}_mask.png" for r in recs)
    (gt / "a0_mask.png").unlink()
    with pytest.raises(DataError, match=r"a0\.png"):
        MVTec(root).records("carpet_syn", "test")


def test_grayscale_image_loads_as_three_channels(mvtec_root):
    rec = MVTec(mvtec_root).records("grid_syn", "test")[0]
    assert Image.open(rec.image).mode == "L"
    assert load_image(rec.image).mode == "RGB"
    assert AnomalyDataset([rec], _preprocess())[0]["image"].shape == (3, 32, 32)


def test_class_names_map(mvtec_root):
    reader = MVTec(mvtec_root, class_names={"nut_syn": "metal nut"})
    assert reader.prompt_name("nut_syn") == "metal nut"
    assert reader.prompt_name("carpet_syn") == "carpet_syn"
    assert Synthetic(mvtec_root, **SMALL).prompt_name("carpet_syn") == "carpet"


def test_visa_reads_csv_and_binarises_class_ids(visa_root):
    reader = VisA(visa_root)
    assert reader.categories == ["candle_syn", "capsules_syn", "pcb_syn"]
    assert len(reader.records("pcb_syn", "train")) == 4
    test = reader.records("pcb_syn", "test")
    assert [r.label for r in test].count(1) == 4 and [r.label for r in test].count(0) == 2
    rec = next(r for r in test if r.label and np.array(Image.open(r.mask)).max() == 2)
    raw = np.array(Image.open(rec.mask))
    assert set(np.unique(raw).tolist()) == {0, 2}
    assert np.array_equal(load_mask(rec.mask), raw != 0)
    assert AnomalyDataset([rec], _preprocess())[0]["mask"].sum() > 0


def test_visa_non_square_squashed_with_aligned_mask(visa_root):
    recs = [r for r in VisA(visa_root).records("candle_syn", "test") if r.label]
    for rec in recs:
        raw = load_mask(rec.mask)  # (64, 80)
        sample = AnomalyDataset([rec], _preprocess(32))[0]
        assert sample["image"].shape == (3, 32, 32) and sample["orig_size"].tolist() == [64, 80]
        ys, xs = np.nonzero(raw)
        ys2, xs2 = np.nonzero(sample["mask"].numpy())
        if len(ys2) == 0:  # a 1-px crack can vanish under bilinear_threshold
            continue
        assert abs(ys.mean() / 64 - ys2.mean() / 32) < 0.05
        assert abs(xs.mean() / 80 - xs2.mean() / 32) < 0.05


def _folder_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)  # noqa: E731
    _save(root / "widget/train/good/a.jpg", img())
    _save(root / "widget/train/good/b.JPG", img())
    _save(root / "widget/test/good/c.png", img())
    _save(root / "widget/test/scratch/d.bmp", img())
    mask = np.zeros((24, 24), np.uint8)
    mask[5:9, 5:9] = 255
    _save(root / "widget/ground_truth/scratch/d_mask.png", mask)
    _save(root / "widget/test/dent/e.png", img())  # no mask: classification-only
    return root


def test_folder_tree_with_unmasked_defect(tmp_path):
    reader = Folder(_folder_tree(tmp_path))
    assert reader.categories == ["widget"]
    assert len(reader.records("widget", "train")) == 2
    samples = {Path(s["path"]).stem: s for s in AnomalyDataset(reader.records("widget", "test"), _preprocess())}
    assert samples["e"]["has_mask"] is False and samples["e"]["label"] == 1 and samples["e"]["mask"].sum() == 0
    assert samples["d"]["has_mask"] is True and samples["d"]["mask"].sum() > 0
    assert samples["c"]["has_mask"] is True and samples["c"]["label"] == 0


def test_folder_manifest(tmp_path):
    _folder_tree(tmp_path / "data")
    manifest = tmp_path / "data" / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    rows = [
        ["category", "split", "label", "image", "mask"],
        ["widget", "train", "normal", "../widget/train/good/a.jpg", ""],
        ["widget", "test", "normal", "../widget/test/good/c.png", ""],
        [
            "widget",
            "test",
            "anomaly",
            "../widget/test/scratch/d.bmp",
            "../widget/ground_truth/scratch/d_mask.png",
        ],
        ["widget", "test", "anomaly", "../widget/test/dent/e.png", ""],
    ]
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    reader = Folder(tmp_path / "data", manifest="lists/manifest.csv")
    test = reader.records("widget", "test")
    assert [r.label for r in test] == [0, 1, 1]
    assert test[1].mask is not None and test[2].mask is None
    assert [s["has_mask"] for s in AnomalyDataset(test, _preprocess())] == [True, True, False]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [MVTec, VisA, Folder])
def test_missing_root(tmp_path, reader):
    with pytest.raises(DataError, match="nowhere"):
        reader(tmp_path / "nowhere")


def test_unknown_category_and_missing_csv(mvtec_root, visa_root, tmp_path):
    with pytest.raises(DataError, match="cable"):
        MVTec(mvtec_root, categories=["cable"])
    with pytest.raises(DataError, match="cable"):
        VisA(visa_root, categories=["cable"])
    with pytest.raises(DataError, match=r"split_csv/1cls\.csv"):
        VisA(tmp_path)


def test_corrupt_image_and_mask_size_mismatch(tmp_path):
    root = _folder_tree(tmp_path)
    (root / "widget/test/good/c.png").write_bytes(b"not a png at all")
    _save(root / "widget/ground_truth/scratch/d_mask.png", np.zeros((10, 12), np.uint8))
    by_stem = {r.image.stem: r for r in Folder(root).records("widget", "test")}
    with pytest.raises(DataError, match=r"c\.png"):
        AnomalyDataset([by_stem["c"]], _preprocess())[0]
    with pytest.raises(DataError, match=r"d_mask\.png.*d\.bmp"):
        AnomalyDataset([by_stem["d"]], _preprocess())[0]


def test_empty_split(tmp_path):
    (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*widget/train"):
        MVTec(tmp_path).records("widget", "train")


# --- preprocessing -------------------------------------------------------------------------------


def test_preprocess_output_and_normalisation():
    image = Image.new("RGB", (50, 40), (200, 100, 30))
    pixels, mask = _preprocess(16)(image, None)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert mask.shape == (16, 16) and mask.dtype == torch.float32 and mask.sum() == 0
    expected = (torch.tensor([200, 100, 30]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels.mean((1, 2)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="mask_resize"):
        _preprocess(mask_resize="bicubic")


def test_preprocess_mask_policies_differ_on_thin_structure():
    image = Image.new("RGB", (64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 11] = 1  # 1-px line, halved by the downscale
    bilinear = _preprocess(32)(image, mask)[1]
    nearest = _preprocess(32, mask_resize="nearest")(image, mask)[1]
    assert set(torch.unique(bilinear).tolist()) <= {0.0, 1.0}
    assert nearest.sum() == 32 and bilinear.sum() == 0


def test_preprocess_shorter_side_crop_and_augment():
    image = Image.new("RGB", (80, 40))
    mask = np.zeros((40, 80), np.uint8)
    mask[:, :40] = 1  # left half of the image
    _, squash = _preprocess(20)(image, mask)
    _, crop = _preprocess(20, resize_mode="shorter_side_crop")(image, mask)
    assert squash[:, :10].all() and not squash[:, 10:].any()
    assert crop[:, :10].all() and not crop[:, 10:].any()  # centre crop keeps x in [20, 60)
    _, flipped = _preprocess(20, augment=A.HorizontalFlip(p=1.0))(image, mask)
    assert torch.equal(flipped, squash.flip(1))


# --- DataModule ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def datamodule(mvtec_root, visa_root) -> AnomalyDataModule:
    return AnomalyDataModule(MVTec(mvtec_root), fit_set=VisA(visa_root), image_size=32, batch_size=4, seed=0)


def test_test_dataloaders_one_per_category(datamodule):
    loaders = datamodule.test_dataloader()
    assert len(loaders) == len(datamodule.test_categories) == 4
    for category, loader in zip(datamodule.test_categories, loaders, strict=True):
        batches = list(loader)
        assert {c for b in batches for c in b["category"]} == {category}
        assert sum(len(b["label"]) for b in batches) == 6
        assert batches[0]["image"].shape[1:] == (3, 32, 32) and batches[0]["orig_size"].shape[1:] == (2,)


def test_train_dataloader_mixes_categories(datamodule):
    batches = list(datamodule.train_dataloader())
    categories = [c for b in batches for c in b["category"]]
    assert len(categories) == 3 * 6 and set(categories) == {"candle_syn", "capsules_syn", "pcb_syn"}
    assert any(len(set(b["category"])) > 1 for b in batches)
    again = [c for b in datamodule.train_dataloader() for c in b["category"]]
    assert again == categories  # seeded shuffle


def test_reference_images(datamodule):
    images, paths = datamodule.reference_images("carpet_syn", 3, seed=0)
    images2, paths2 = datamodule.reference_images("carpet_syn", 3, seed=0)
    _, paths_other = datamodule.reference_images("carpet_syn", 3, seed=1)
    assert images.shape == (3, 3, 32, 32) and torch.equal(images, images2) and paths == paths2
    assert len(set(paths)) == 3 and all("/train/good/" in p for p in paths)
    assert paths_other != paths
    with pytest.raises(DataError, match="k=5"):
        datamodule.reference_images("carpet_syn", 5, seed=0)


# --- mask values (hardening issue item 6) --------------------------------------------------------


def test_soft_mask_is_an_error_naming_the_values(tmp_path):
    root = _folder_tree(tmp_path)
    gradient = np.tile(np.arange(24, dtype=np.uint8) * 10, (24, 1))  # a soft mask: != 0 would mark 96 %
    mask_path = _save(root / "widget/ground_truth/scratch/d_mask.png", gradient)
    rec = next(r for r in Folder(root).records("widget", "test") if r.image.stem == "d")
    with pytest.raises(DataError, match=rf"{mask_path}: not a binary mask: 23 non-zero values \(10, 20, 30"):
        AnomalyDataset([rec], _preprocess(24))[0]
    with pytest.raises(DataError, match="mask_threshold"):
        load_mask(mask_path)
    assert np.array_equal(load_mask(mask_path, threshold=128), gradient >= 128)
    thresholded = Folder(root, mask_threshold=128)
    samples = {Path(s["path"]).stem: s for s in AnomalyDataModule(thresholded, image_size=24).test_dataset("widget")}
    assert samples["d"]["mask"].mean() == pytest.approx(11 / 24)  # columns 13..23 are >= 128
    with pytest.raises(DataError, match="mask_threshold must be"):
        Folder(root, mask_threshold=300)


@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0, 7)])
def test_binary_masks_of_any_foreground_value(tmp_path, values):
    mask = np.full((4, 4), values[0], np.uint8)
    mask[1:3, 1:3] = values[1]
    assert np.array_equal(load_mask(_save(tmp_path / "m.png", mask)), mask != 0)


def test_visa_class_id_masks_stay_valid_and_gradients_do_not(tmp_path):
    ids = np.array([[0, 1, 2, 3]], np.uint8)
    assert np.array_equal(load_mask(_save(tmp_path / "ids.png", ids), class_ids=True), ids != 0)
    with pytest.raises(DataError, match="not a binary mask"):
        load_mask(tmp_path / "ids.png")  # several values are class ids only where the reader says so (VisA)
    soft = np.array([[0, 40, 128, 250]], np.uint8)
    with pytest.raises(DataError, match=r"class ids 1\.\.127"):
        load_mask(_save(tmp_path / "soft.png", soft), class_ids=True)


def test_visa_anomaly_row_without_mask_is_an_error(visa_root, tmp_path):
    root = Path(shutil.copytree(visa_root, tmp_path / "visa"))
    csv_path = root / "split_csv" / "1cls.csv"
    with csv_path.open() as f:
        rows = list(csv.reader(f))
    blanked = [i for i, r in enumerate(rows) if r[0] == "pcb_syn" and r[1] == "test" and r[2] == "anomaly"][:2]
    for i in blanked:
        rows[i][4] = ""
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as info:
        VisA(root).records("pcb_syn", "test")
    assert str(info.value).startswith(f"2 problems in {csv_path} (pcb_syn, test):")
    assert all(f"line {i + 1}: anomaly row without a mask" in str(info.value) for i in blanked)
    assert len(VisA(root).records("candle_syn", "test")) == 6  # other objects unaffected


def test_mvtec_lists_every_missing_mask(tmp_path):
    root = generate(tmp_path, "mvtec", ["carpet_syn"], **SMALL)
    masks = sorted((root / "carpet_syn" / "ground_truth").rglob("*_mask.png"))
    for mask in masks:
        mask.unlink()
    with pytest.raises(DataError) as info:
        MVTec(root).records("carpet_syn", "test")
    assert str(info.value).startswith(f"{len(masks)} masks missing in {root / 'carpet_syn' / 'test'}")
    assert all(str(m) in str(info.value) for m in masks)


# --- bad CSV input (hardening issue item 8) -----------------------------------------------------


def _visa_with_csv(tmp_path: Path, content: bytes) -> Path:
    (tmp_path / "split_csv").mkdir(parents=True)
    (tmp_path / "split_csv" / "1cls.csv").write_bytes(content)
    return tmp_path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            np.random.default_rng(0).bytes(3000),
            r"1cls\.csv: not a UTF-8 text CSV \(byte 0x[0-9a-f]{2} at offset \d+\)$",
        ),
        (
            b"object,split,label,image,mask\n\x00\x00" + b"y" * 3000,
            r"1cls\.csv: not a text CSV \(NUL byte at offset 30\)$",
        ),
        (
            b'object,split,label,image,mask\n\nc,train,normal,a.png,\nc,test,"normal,b.png,\n'
            + b"c,test,normal,x,\n" * 300,
            r"1cls\.csv line 4: unbalanced quote \(a quoted field runs to the end of the file\)$",
        ),
        (
            b"object,split,label,image\n" + b"z" * 3000 + b"\n",
            r"1cls\.csv line 1: header .* lacks columns mask \(expected object,split,label,image,mask\)$",
        ),
        (b"o" * 3000 + b"\nx\n", r"1cls\.csv line 1: header 'ooo.*\.\.\. \(3000 characters\) lacks columns"),
    ],
)
def test_bad_csv_is_one_short_line(tmp_path, content, message):
    with pytest.raises(DataError, match=message) as info:
        VisA(_visa_with_csv(tmp_path, content))
    assert len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 250 + len(str(tmp_path))


def test_csv_line_numbers_count_blank_lines_and_long_values_are_cut(tmp_path):
    long_label = "normal" * 500
    content = f"object,split,label,image,mask\n\n\nc,train,{long_label},a.png,\n".encode()
    with pytest.raises(DataError, match=r"1cls\.csv line 4: unknown label 'normalnormal.*\(3000 characters\)") as info:
        VisA(_visa_with_csv(tmp_path, content)).records("c", "train")
    assert len(str(info.value)) < 250 + len(str(tmp_path))


# --- Folder layouts (stretch) -------------------------------------------------------------------


def test_folder_single_product_root(tmp_path):
    product = _folder_tree(tmp_path / "tree") / "widget"
    reader = Folder(product)  # train/, test/, ground_truth/ directly inside
    assert reader.categories == ["widget"] and reader.single_product
    test = reader.records("widget", "test")
    assert [(r.image.name, r.label, r.mask is not None) for r in test] == [
        ("e.png", 1, False),
        ("c.png", 0, False),
        ("d.bmp", 1, True),
    ]
    assert all(r.category == "widget" for r in test)
    assert len(reader.records("widget", "train")) == 2
    assert AnomalyDataModule(reader, image_size=24).test_dataset("widget")[2]["mask"].sum() > 0


def test_folder_unrecognised_layout_lists_the_accepted_ones(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        Folder(tmp_path)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"no dataset layout recognised in {tmp_path} (it holds images/, notes.txt)" in message
    assert "<root>/<category>/train|test/..." in message and "<root>/train|test/..." in message
    assert "data.manifest=<csv>" in message
