"""MVTec-AD reader (official layout, read in place) and the tree walker shared with Folder."""

from __future__ import annotations

from pathlib import Path

from vlmad.data.records import (
    IMAGE_EXTS,
    DataError,
    Reader,
    Record,
    check_threshold,
    existing_root,
    problems_error,
    select_categories,
)


def tree_categories(root: Path) -> list[str]:
    """Sorted subfolders of ``root`` that contain a ``train`` or ``test`` folder."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def list_images(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive extension match), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )


def find_mask(gt_dir: Path, stem: str, exts: tuple[str, ...]) -> Path | None:
    """The mask ``<gt_dir>/<stem>_mask<ext>`` for the first extension that exists, else None."""
    for ext in exts:
        for candidate in (gt_dir / f"{stem}_mask{ext}", gt_dir / f"{stem}_mask{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def read_tree(
    category_dir: Path,
    split: str,
    mask_exts: tuple[str, ...] = (".png",),
    mask_required: bool = True,
) -> list[Record]:
    """Index ``<category_dir>/<split>/<defect>/*`` with masks derived from each image's own path.

    The mask of ``test/<defect>/<stem>.<ext>`` is ``ground_truth/<defect>/<stem>_mask.png``; pairing by
    sorted position (as some reference meta-file generators do) silently misaligns masks when a file
    is missing or named differently, so each mask is looked up from its image.

    Args:
        category_dir: ``<root>/<category>``.
        split: "train" or "test".
        mask_exts: extensions tried for masks.
        mask_required: raise DataError for an anomalous image without a mask (MVTec); otherwise the
            record gets ``mask=None`` (classification-only).

    Returns:
        Records sorted by defect type, then file name.
    """
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir}")
    records, missing = [], []
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            mask = None
            if defect != "good":
                gt_dir = category_dir / "ground_truth" / defect
                mask = find_mask(gt_dir, image.stem, mask_exts)
                if mask is None and mask_required:
                    missing.append(
                        f"mask missing for {image}: expected {gt_dir / (image.stem + '_mask' + mask_exts[0])}"
                    )
            records.append(Record(image, mask, int(defect != "good"), category_dir.name, defect))
    if missing:
        raise problems_error(f"{len(missing)} masks missing in {split_dir}:", missing)
    if not records:
        raise DataError(f"no images in {split_dir}")
    return records


class MVTec(Reader):
    """MVTec-AD, ``<root>/<category>/{train,test,ground_truth}``, read in place.

    Args:
        root: dataset root.
        categories: subset to use; default: sorted subfolders holding ``train`` or ``test``.
        class_names: prompt names per category (e.g. ``{"metal_nut": "metal nut"}``); identity by default.
        mask_threshold: binarise masks with ``>= threshold`` (8-bit scale) instead of requiring 0/255.
    """

    name = "mvtec"

    def __init__(
        self,
        root: str | Path,
        categories: list[str] | None = None,
        class_names: dict[str, str] | None = None,
        mask_threshold: int | None = None,
    ) -> None:
        self.root = existing_root(root)
        self.mask_threshold = check_threshold(mask_threshold)
        self.categories = select_categories(tree_categories(self.root), categories, self.root)
        self.class_names = dict(class_names or {})

    def records(self, category: str, split: str) -> list[Record]:
        """Index one category's split; label 0 for ``good``, 1 otherwise."""
        self._check(category, split)
        return read_tree(self.root / category, split)
