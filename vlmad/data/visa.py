"""VisA reader: the raw release read in place through its protocol CSV (no converted copy)."""

from __future__ import annotations

from pathlib import Path

from vlmad.data.records import (
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

VISA_COLUMNS = ("object", "split", "label", "image", "mask")


class VisA(Reader):
    """VisA from ``<root>/split_csv/1cls.csv`` (columns ``object,split,label,image,mask``).

    Image and mask paths come from each CSV row (relative to ``root``); masks hold small class ids and
    are binarised with ``!= 0`` at load time. VisA has no per-image defect type in the CSV, so
    anomalous records get ``defect_type="anomaly"``. Every anomaly row of the official release has a
    mask, so an anomaly row with an empty ``mask`` field is an error (it would silently leave pixel
    metrics); classification-only anomalies belong in a ``data=folder`` manifest, which allows them.

    Args:
        root: VisA root (the folder holding ``candle/``, ``split_csv/``, ...).
        categories: subset of objects; default: all objects in the CSV, sorted.
        class_names: prompt names per object; identity by default.
        split_csv: protocol file, relative to ``root``.
        mask_threshold: binarise masks with ``>= threshold`` (8-bit scale) instead of reading class ids.
    """

    name = "visa"
    mask_class_ids = True

    def __init__(
        self,
        root: str | Path,
        categories: list[str] | None = None,
        class_names: dict[str, str] | None = None,
        split_csv: str = "split_csv/1cls.csv",
        mask_threshold: int | None = None,
    ) -> None:
        self.root = existing_root(root)
        self.mask_threshold = check_threshold(mask_threshold)
        self.csv_path = self.root / split_csv
        self._rows = read_csv(self.csv_path, VISA_COLUMNS)
        self.categories = select_categories(sorted({r["object"] for _, r in self._rows}), categories, self.csv_path)
        self.class_names = dict(class_names or {})

    def records(self, category: str, split: str) -> list[Record]:
        """Index one object's split, in CSV order."""
        self._check(category, split)
        records, problems = [], []
        for line, row in self._rows:
            if row["object"] != category or row["split"] != split:
                continue
            where = f"{self.csv_path} line {line}"
            label = parse_label(row["label"], where)
            image = self.root / row["image"]
            mask = self.root / row["mask"] if row["mask"] else None
            if label == 1 and mask is None:
                problems.append(f"{where}: anomaly row without a mask ({row['image']})")
            problems += [f"{where}: file not found: {p}" for p in (image, mask) if p is not None and not p.is_file()]
            records.append(Record(image, mask, label, category, "anomaly" if label else "good"))
        if problems:
            raise problems_error(f"{len(problems)} problems in {self.csv_path} ({category}, {split}):", problems)
        if not records:
            raise DataError(f"no images in {self.csv_path} for object {category!r}, split {split!r}")
        return records
