"""Sample index entries, the data error type and helpers shared by the readers."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from vlmad.errors import VlmadError

# Longest listing in one DataError; the rest is counted.
MAX_LISTED = 20
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")


class DataError(VlmadError, ValueError):
    """Bad dataset input; the message names the offending file or directory and the problem.

    Args:
        message: the whole message.
        problems: the individual "file: problem" lines when the error lists several (else empty).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Record:
    """One indexed image (no pixels loaded).

    Attributes:
        image: path of the image file.
        mask: path of the ground-truth mask, or None (normal image, or classification-only anomaly).
        label: 0 normal, 1 anomalous.
        category: category / object name as on disk.
        defect_type: "good" for normal images.
    """

    image: Path
    mask: Path | None
    label: int
    category: str
    defect_type: str


class Reader:
    """Common part of the dataset readers: category selection, prompt names, split checks.

    ``mask_threshold`` (None: masks must be binary) and ``mask_class_ids`` (VisA's multi-valued
    class-id masks are valid) tell the datasets how to read this reader's masks (see ``load_mask``).
    """

    name: str = "reader"
    root: Path
    categories: list[str]
    class_names: dict[str, str]
    mask_threshold: int | None = None
    mask_class_ids: bool = False

    def records(self, category: str, split: str) -> list[Record]:
        """Index one category's split ("train" or "test")."""
        raise NotImplementedError

    def prompt_name(self, category: str) -> str:
        """Name used in text prompts (``class_names`` map, identity by default)."""
        return self.class_names.get(category, category)

    def _check(self, category: str, split: str) -> None:
        if category not in self.categories:
            raise DataError(f"unknown category {category!r} for {self.root} (known: {self.categories})")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (expected one of {SPLITS}) for {self.root}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, categories={self.categories})"


def problems_error(summary: str, problems: list[str], limit: int = MAX_LISTED) -> DataError:
    """One DataError listing every problem, one per line, at most ``limit`` lines plus "... and N more".

    Args:
        summary: first line, e.g. "3 problems in /data/mvtec".
        problems: "file: problem" lines.
        limit: lines shown.
    """
    lines = [summary, *(f"  {p}" for p in problems[:limit])]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return DataError("\n".join(lines), problems)


def check_threshold(threshold: int | None) -> int | None:
    """Validate a ``mask_threshold`` setting (None or an int in 1..255)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= 255:
        raise DataError(f"mask_threshold must be null or an integer in 1..255 (8-bit scale), got {threshold!r}")
    return threshold


def existing_root(root: str | Path) -> Path:
    """Return ``root`` as a Path, raising DataError if it is not a directory."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset root not found: {path}")
    return path


def select_categories(available: list[str], requested: list[str] | None, where: Path) -> list[str]:
    """Validate the requested categories against those found in ``where``; default: all available."""
    if requested is None:
        if not available:
            raise DataError(f"no categories found in {where}")
        return list(available)
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise DataError(f"unknown categories {unknown} in {where} (available: {available})")
    return list(requested)


def short(text: str, limit: int = 60) -> str:
    """``repr`` of ``text`` cut to about ``limit`` characters, for quoting file content in one-line messages."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def csv_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Parse a text CSV into (line number, fields) pairs, blank lines skipped; DataError on anything else.

    Line numbers are those an editor shows (the header is line 1). A quoted field spanning lines is
    reported as an unbalanced quote: none of vlmad's CSVs has multi-line fields, and the csv module
    would otherwise swallow the rest of the file into one value.
    """
    if not path.is_file():
        raise DataError(f"CSV file not found: expected {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheet programs write
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not a UTF-8 text CSV (byte 0x{err.object[err.start]:02x} at offset {err.start})"
        ) from None
    if "\x00" in text:
        raise DataError(f"{path}: not a text CSV (NUL byte at offset {text.index(chr(0))})")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, start = [], 1
    try:
        for fields in reader:
            if any("\n" in f or "\r" in f for f in fields):
                raise DataError(
                    f"{path} line {start}: unbalanced quote (a quoted field runs on to line {reader.line_num})"
                )
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        # the row that failed started at `start`; "unexpected end of data" is a quote never closed
        problem = "unbalanced quote (a quoted field runs to the end of the file)" if "end of data" in str(err) else err
        raise DataError(f"{path} line {start}: {problem}") from None
    return rows


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV with a header, checking that the ``required`` columns are present.

    Returns:
        (line number, {column: stripped value}) per data row; missing trailing fields read as "".
    """
    lines = csv_lines(path)
    if not lines:
        raise DataError(f"{path}: empty CSV (expected a header with columns {list(required)})")
    header = [h.strip() for h in lines[0][1]]
    missing = [c for c in required if c not in header]
    if missing:
        shown, expected = short(",".join(header)), ",".join(required)
        raise DataError(f"{path} line 1: header {shown} lacks columns {','.join(missing)} (expected {expected})")
    return [(line, {h: (f[i].strip() if i < len(f) else "") for i, h in enumerate(header)}) for line, f in lines[1:]]


def parse_label(value: str, where: str) -> int:
    """Map a CSV label (normal/anomaly, also good/0/1) to 0/1."""
    labels = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "anomalous": 1, "1": 1}
    try:
        return labels[value.lower()]
    except KeyError:
        raise DataError(f"{where}: unknown label {short(value)} (expected 'normal' or 'anomaly')") from None
