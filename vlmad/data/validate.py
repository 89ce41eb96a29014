"""Up-front check of a run's data: every problem reported at once, before the backbone is built or anything scored.

Torch-free (readers, PIL and numpy only). Images are checked from their headers (``Image.verify``, no
pixel decoding); masks are small single-channel files and are decoded, because their values and
emptiness are part of the check.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmad.data.imageio import binarise_mask, read_mask_values
from vlmad.data.records import DataError, Reader, Record, problems_error

# Empty-mask files named in one warning; the rest is counted.
WARN_LISTED = 3


class DataWarning(UserWarning):
    """Suspicious but usable data (e.g. a defective image whose mask marks no pixel)."""


def image_problem(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Open an image's header and verify its structure without decoding the pixels.

    Returns:
        ((W, H), None) if the file looks readable, else (None, problem).
    """
    if not path.is_file():
        return None, "image file not found"
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()  # PNG: chunk CRCs; catches truncated or overwritten files cheaply
    except UnidentifiedImageError:
        return None, "cannot read image: not an image file PIL can identify"
    except Exception as err:  # PIL raises many types for broken files; each becomes one report line
        return None, f"cannot read image: {type(err).__name__}: {err}"
    return size, None


def _binarised(path: Path, threshold: int | None, class_ids: bool) -> tuple[np.ndarray | None, str | None]:
    """Mask as (H, W) bool the way ``load_mask`` reads it, or (None, problem)."""
    try:
        arr, mode = read_mask_values(path)
    except DataError as err:
        return None, str(err)
    try:
        return binarise_mask(arr, mode, threshold, class_ids), None
    except DataError as err:
        return None, str(err)


def check_records(reader: Reader, records: list[Record]) -> tuple[list[str], list[Path]]:
    """Check images and masks of some records.

    Returns:
        ("file: problem" lines, masks of defective images that mark no pixel).
    """
    problems, empty = [], []
    for rec in records:
        size, problem = image_problem(rec.image)
        if problem:
            problems.append(f"{rec.image}: {problem}")
        if rec.mask is None:
            continue
        if not rec.mask.is_file():
            problems.append(f"{rec.mask}: mask file not found (for {rec.image})")
            continue
        mask, problem = _binarised(rec.mask, reader.mask_threshold, reader.mask_class_ids)
        if problem:
            problems.append(f"{rec.mask}: {problem}")
        elif size is not None and mask.shape != (size[1], size[0]):
            problems.append(
                f"{rec.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, image {rec.image} is {size[0]}x{size[1]}"
            )
        elif rec.label == 1 and not mask.any():
            empty.append(rec.mask)
    return problems, empty


def _records(reader: Reader, category: str, split: str, problems: list[str]) -> list[Record]:
    """``reader.records`` with its errors added to ``problems`` instead of raised."""
    try:
        return reader.records(category, split)
    except DataError as err:
        problems.extend(err.problems or [str(err)])
        return []


def _warn_empty(category: str, empty: list[Path]) -> None:
    listed = ", ".join(str(p) for p in empty[:WARN_LISTED]) + (" ..." if len(empty) > WARN_LISTED else "")
    warnings.warn(
        f"{category}: {len(empty)} defective images have an all-zero mask ({listed}); they keep label 1 and "
        "count in the pixel metrics with no defect pixels",
        DataWarning,
        stacklevel=3,
    )


def _check_split(
    reader: Reader, split: str, k_shot: int, problems: list[str], seen: set[Path], min_images: tuple[int, str]
) -> None:
    for category in reader.categories:
        records = _records(reader, category, split, problems)
        if 0 < len(records) < min_images[0]:
            where = records[0].image.parent.parent if records else reader.root / category
            problems.append(f"{where}: {len(records)} {split} images of {category!r}: {min_images[1]}")
        records = [r for r in records if r.image not in seen]
        seen.update(r.image for r in records)
        if k_shot > 0:
            train = _records(reader, category, "train", problems)
            normal = [r for r in train if r.label == 0]
            if len(normal) < k_shot:
                where = normal[0].image.parent if normal else reader.root / category
                problems.append(
                    f"{where}: only {len(normal)} normal training images of {category!r} for k_shot={k_shot}"
                )
            records += [r for r in normal if r.image not in seen]
            seen.update(r.image for r in normal)
        found, empty = check_records(reader, records)
        problems += found
        if empty:
            _warn_empty(category, empty)


def validate_data(
    test_set: Reader,
    k_shot: int = 0,
    fit_set: Reader | None = None,
    fit_split: str = "test",
    min_test_images: tuple[int, str] = (1, ""),
) -> None:
    """Check every selected category before any scoring; raise one DataError listing all problems.

    Checked: every test image (and, for k_shot > 0, every normal training image) opens; masks exist,
    are readable, binary (or class ids / thresholded as the reader says) and have their image's size;
    each category has at least ``k_shot`` normal training images and as many test images as the method needs;
    the same for ``fit_set``'s
    ``fit_split``. Defective images with an all-zero mask only warn (``DataWarning``), once per category.

    Args:
        test_set: the evaluated reader.
        k_shot: few-shot reference images per category (0: the train split is not read).
        fit_set: optional reader fitted on.
        fit_split: split of ``fit_set`` that is fitted on.
        min_test_images: (fewest test images per category, why): the method's ``min_test_images``.

    Raises:
        DataError: every problem, one "file: problem" line each (at most 20 listed, then a count).
    """
    problems: list[str] = []
    seen: set[Path] = set()
    _check_split(test_set, "test", k_shot, problems, seen, min_test_images)
    if fit_set is not None:
        _check_split(fit_set, fit_split, 0, problems, seen, (1, ""))
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        raise problems_error(f"{len(problems)} data {noun} found before scoring (nothing was run):", problems)
