"""Per-category result tables: unweighted mean row, text / markdown rendering and `metrics.csv` I/O."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np

from vlmad.data.records import DataError, csv_lines, short
from vlmad.io import atomic_write
from vlmad.metrics.names import METRIC_NAMES, UndefinedMetricWarning

MEAN_ROW = "mean"
# Trailing metrics.csv columns: how many categories a row's image / pixel metrics average (a category row: 1,
# or 0 where they are undefined; the mean row: the sum). Derived from the values, so `read_csv` drops them.
COUNT_COLUMNS = {"n_categories_image": "image_", "n_categories_pixel": "pixel_"}


def _defined(values: dict[str, float], prefix: str) -> bool:
    """Whether any metric of the family (``image_`` / ``pixel_``) has a value in this row."""
    return any(k.startswith(prefix) and not math.isnan(v) for k, v in values.items())


def category_counts(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """Per row, the number of categories its image and pixel metrics average (keys of ``COUNT_COLUMNS``).

    Args:
        rows: {category: {metric: fraction}}, optionally with the `mean` row.

    Returns:
        {row: {count column: n}}: 1 or 0 for a category, the sum over categories for `mean`.
    """
    counts = {
        name: {col: int(_defined(values, prefix)) for col, prefix in COUNT_COLUMNS.items()}
        for name, values in rows.items()
        if name != MEAN_ROW
    }
    if MEAN_ROW in rows:
        counts[MEAN_ROW] = {col: sum(c[col] for c in counts.values()) for col in COUNT_COLUMNS}
    return counts


def coverage_notes(rows: dict[str, dict[str, float]]) -> list[str]:
    """One line per metric family the `mean` row averages over fewer than all categories (empty if none)."""
    categories = [c for c in rows if c != MEAN_ROW]
    notes = []
    for prefix in COUNT_COLUMNS.values():
        missing = [c for c in categories if not _defined(rows[c], prefix)]
        if missing and len(missing) < len(categories):
            family = prefix.rstrip("_")
            notes.append(
                f"mean of {family} metrics over {len(categories) - len(missing)} of {len(categories)} categories "
                f"({family} metrics undefined for {', '.join(missing)})"
            )
    return notes


def _columns(rows: dict[str, dict[str, float]]) -> list[str]:
    """METRIC_NAMES first, then any extra metric in first-seen order (stable across runs)."""
    extra: list[str] = []
    for values in rows.values():
        extra.extend(k for k in values if k not in METRIC_NAMES and k not in extra)
    return [*METRIC_NAMES, *extra]


def _ordered(rows: dict[str, dict[str, float]]) -> list[str]:
    """Category names with the mean row last."""
    return [c for c in rows if c != MEAN_ROW] + ([MEAN_ROW] if MEAN_ROW in rows else [])


def summarise(per_category: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add the `mean` row: unweighted mean over categories, ignoring NaN (all NaN -> NaN).

    Args:
        per_category: {category: {metric: fraction}}.

    Returns:
        A copy with the `mean` row appended (an existing `mean` row is replaced). Categories whose image or
        pixel metrics are all undefined are named in an ``UndefinedMetricWarning``.
    """
    categories = {c: dict(v) for c, v in per_category.items() if c != MEAN_ROW}
    mean: dict[str, float] = {}
    for column in _columns(categories):
        values = np.array([v.get(column, math.nan) for v in categories.values()], dtype=np.float64)
        finite = values[~np.isnan(values)]
        mean[column] = float(finite.mean()) if finite.size else math.nan
    for note in coverage_notes({**categories, MEAN_ROW: mean}):
        warnings.warn(note, UndefinedMetricWarning, stacklevel=2)
    return {**categories, MEAN_ROW: mean}


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else percent(value)


def percent(value: float, std: float | None = None) -> str:
    """``61.1`` or ``61.1 ± 2.3`` for fractions; never ``-0.0`` (a rounded float-noise negative shows as 0.0)."""
    text = f"{round(100 * value, 1) + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0
    return text + (f" ± {round(100 * std, 1) + 0.0:.1f}" if std is not None and not math.isnan(std) else "")


def number(value: float) -> str:
    """A float for a CSV file: ``repr`` (round-trips), ``nan``, and ``0.0`` for a negative zero."""
    return "nan" if math.isnan(value) else repr(float(value) + 0.0)


def render_table(
    header: list[str],
    rows: list[list[str]],
    markdown: bool = False,
    n_left: int = 1,
    rules_before: tuple[int, ...] = (),
) -> str:
    """The one table renderer: fixed-width text or GitHub markdown from cells already formatted.

    Args:
        header: column names.
        rows: one list of cells per row, as long as ``header``.
        markdown: a markdown table instead of fixed-width text.
        n_left: the first ``n_left`` columns are left-aligned (labels), the rest right-aligned (numbers).
        rules_before: text only: row indices preceded by a separator line (e.g. the mean row).

    Returns:
        The table as one string, without a trailing newline.
    """
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * n_left + "---:|" * (len(header) - n_left)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < n_left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    first = line(header)
    out = [first, "-" * len(first)]
    for i, cells in enumerate(rows):
        out += ["-" * len(first)] * (i in rules_before) + [line(cells)]
    return "\n".join(out)


def format_table(rows: dict[str, dict[str, float]], title: str | None = None) -> str:
    """Fixed-width text table in percent with one decimal; `mean` last, after a separator line.

    Args:
        rows: {category: {metric: fraction}}, e.g. the output of `summarise`.
        title: optional first line.

    Returns:
        The table as one string.
    """
    columns, names = _columns(rows), _ordered(rows)
    cells = [[name, *(_percent(rows[name].get(c)) for c in columns)] for name in names]
    rule = (len(names) - 1,) if names[-1:] == [MEAN_ROW] and len(names) > 1 else ()
    table = render_table(["category", *columns], cells, rules_before=rule)
    return "\n".join(([title] if title else []) + [table] + coverage_notes(rows))


def format_markdown(rows: dict[str, dict[str, float]], title: str | None = None) -> str:
    """GitHub markdown table in percent with one decimal; `mean` last and in bold.

    Args:
        rows: {category: {metric: fraction}}.
        title: optional heading line.

    Returns:
        The markdown as one string.
    """
    columns = _columns(rows)
    cells = [[f"**{n}**" if n == MEAN_ROW else n, *(_percent(rows[n].get(c)) for c in columns)] for n in _ordered(rows)]
    notes = coverage_notes(rows)
    out = [f"**{title}**", ""] if title else []
    return "\n".join(
        [*out, render_table(["category", *columns], cells, markdown=True), *(["", *notes] if notes else [])]
    )


def write_csv(path: str | os.PathLike, rows: dict[str, dict[str, float]]) -> None:
    """Write fractions (not percent), one row per category, `mean` last; NaN as "nan"; atomic replace.

    The metric columns come first (``METRIC_NAMES``, then extras); the integer ``COUNT_COLUMNS`` follow,
    so the `mean` row says how many categories each family of metrics averages.

    Args:
        path: destination file; parent folders are created.
        rows: {category: {metric: fraction}}.
    """
    columns = _columns(rows)
    counts = category_counts(rows)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["category", *columns, *COUNT_COLUMNS])
    for name in _ordered(rows):
        values = [rows[name].get(c, math.nan) for c in columns]
        cells = [number(v) for v in values]
        writer.writerow([name, *cells, *(counts[name][c] for c in COUNT_COLUMNS)])
    atomic_write(path, text.getvalue())


def read_csv(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a table written by `write_csv` (the derived ``COUNT_COLUMNS`` are dropped).

    Args:
        path: a `metrics.csv`.

    Returns:
        {category: {metric: fraction}} in file order.

    Raises:
        DataError: not such a table; one line naming the file, the line and the problem.
    """
    path = Path(path)
    lines = csv_lines(path)
    header = lines[0][1] if lines else []
    if header[:1] != ["category"]:
        raise DataError(f"{path} line 1: not a metrics table (header {short(','.join(header))} lacks 'category' first)")
    rows: dict[str, dict[str, float]] = {}
    for line, fields in lines[1:]:
        if len(fields) != len(header):
            raise DataError(f"{path} line {line}: {len(fields)} fields, the header has {len(header)}")
        values = {}
        for column, cell in zip(header[1:], fields[1:], strict=True):
            try:
                values[column] = float(cell)
            except ValueError:
                raise DataError(f"{path} line {line}: {column} = {short(cell)} is not a number") from None
        rows[fields[0]] = {k: v for k, v in values.items() if k not in COUNT_COLUMNS}
    return rows
