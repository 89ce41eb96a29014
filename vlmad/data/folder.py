"""Reader for users' own products: an MVTec-style tree or a manifest CSV."""

from __future__ import annotations

from pathlib import Path

from vlmad.data.mvtec import read_tree, tree_categories
from vlmad.data.records import (
    IMAGE_EXTS,
    SPLITS,
    DataError,
    Reader,
    Record,
    check_threshold,
    existing_root,
    parse_label,
    problems_error,
    read_csv,
    select_categories,
)

MANIFEST_COLUMNS = ("category", "split", "label", "image")


def unrecognised_layout(root: Path) -> str:
    """One-line error for a ``root`` in none of the accepted layouts, naming what is there and what is accepted."""
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "") if found else "nothing"
    return (
        f"no dataset layout recognised in {root} (it holds {shown}); accepted: <root>/<category>/train|test/... "
        "(several products), <root>/train|test/... (one product), or data.manifest=<csv> with columns "
        f"{','.join(MANIFEST_COLUMNS)}[,mask]"
    )


class Folder(Reader):
    """A user's dataset, as an MVTec-style tree (any common image extension) or a manifest CSV.

    Tree: ``<root>/<category>/train/good``, ``test/good``, ``test/<defect>``, optional
    ``ground_truth/<defect>/<stem>_mask.<ext>``; or a single product with ``train/``, ``test/`` and
    ``ground_truth/`` directly in ``root`` (its category is named after ``root``). Manifest: columns
    ``category,split,label,image`` plus optional ``mask`` and ``defect_type``; paths relative to the CSV's
    folder. An anomalous image without a mask is classification-only (``Record.mask`` None): it counts for
    image metrics only, rather than getting an all-zero mask that would corrupt pixel metrics.

    Args:
        root: dataset root.
        categories: subset to use; default: all found.
        class_names: prompt names per category; identity by default.
        manifest: manifest CSV path relative to ``root`` (or absolute); None reads the tree.
        mask_threshold: binarise masks with ``>= threshold`` (8-bit scale) instead of requiring binary masks
            (for JPEG or anti-aliased masks).
    """

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        categories: list[str] | None = None,
        class_names: dict[str, str] | None = None,
        manifest: str | None = None,
        mask_threshold: int | None = None,
    ) -> None:
        self.root = existing_root(root)
        self.mask_threshold = check_threshold(mask_threshold)
        self.class_names = dict(class_names or {})
        self._rows: list[tuple[int, dict[str, str]]] | None = None
        self.single_product = manifest is None and any((self.root / s).is_dir() for s in SPLITS)
        if manifest is None:
            available = [self.root.name] if self.single_product else tree_categories(self.root)
            self.manifest_path = None
            if not available:
                raise DataError(unrecognised_layout(self.root))
        else:
            self.manifest_path = self.root / manifest
            self._rows = read_csv(self.manifest_path, MANIFEST_COLUMNS)
            available = sorted({r["category"] for _, r in self._rows})
        self.categories = select_categories(available, categories, self.manifest_path or self.root)

    def records(self, category: str, split: str) -> list[Record]:
        """Index one category's split."""
        self._check(category, split)
        if self._rows is None:
            category_dir = self.root if self.single_product else self.root / category
            return read_tree(category_dir, split, mask_exts=IMAGE_EXTS, mask_required=False)
        return self._manifest_records(category, split)

    def _manifest_records(self, category: str, split: str) -> list[Record]:
        assert self.manifest_path is not None and self._rows is not None
        base = self.manifest_path.parent
        records, problems = [], []
        for line, row in self._rows:
            if row["category"] != category or row["split"] != split:
                continue
            where = f"{self.manifest_path} line {line}"
            label = parse_label(row["label"], where)
            image = base / row["image"]
            mask = base / row["mask"] if row.get("mask") else None
            problems += [f"{where}: file not found: {p}" for p in (image, mask) if p is not None and not p.is_file()]
            defect = row.get("defect_type") or ("anomaly" if label else "good")
            records.append(Record(image, mask, label, category, defect))
        if problems:
            raise problems_error(f"{len(problems)} problems in {self.manifest_path} ({category}, {split}):", problems)
        if not records:
            raise DataError(f"no images in {self.manifest_path} for category {category!r}, split {split!r}")
        return records
