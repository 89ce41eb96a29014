"""Per-category result tables: unweighted mean row, text / markdown rendering and `metrics.csv` I/O."""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from vlmad.metrics.anomaly_metrics import METRIC_NAMES

MEAN_ROW = "mean"


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
        A copy with the `mean` row appended (an existing `mean` row is replaced).
    """
    categories = {c: dict(v) for c, v in per_category.items() if c != MEAN_ROW}
    mean: dict[str, float] = {}
    for column in _columns(categories):
        values = np.array([v.get(column, math.nan) for v in categories.values()], dtype=np.float64)
        finite = values[~np.isnan(values)]
        mean[column] = float(finite.mean()) if finite.size else math.nan
    return {**categories, MEAN_ROW: mean}


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(rows: dict[str, dict[str, float]], title: str | None = None) -> str:
    """Fixed-width text table in percent with one decimal; `mean` last, after a separator line.

    Args:
        rows: {category: {metric: fraction}}, e.g. the output of `summarise`.
        title: optional first line.

    Returns:
        The table as one string.
    """
    columns = _columns(rows)
    names = _ordered(rows)
    first = max([len("category"), *(len(n) for n in names)])
    widths = [max(len(c), 5) for c in columns]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(first), *(c.rjust(w) for c, w in zip(cells[1:], widths, strict=True))])

    header = line(["category", *columns])
    out = [title] if title else []
    out += [header, "-" * len(header)]
    for name in names:
        if name == MEAN_ROW and len(names) > 1:
            out.append("-" * len(header))
        out.append(line([name, *(_percent(rows[name].get(c)) for c in columns)]))
    return "\n".join(out)


def format_markdown(rows: dict[str, dict[str, float]], title: str | None = None) -> str:
    """GitHub markdown table in percent with one decimal; `mean` last and in bold.

    Args:
        rows: {category: {metric: fraction}}.
        title: optional heading line.

    Returns:
        The markdown as one string.
    """
    columns = _columns(rows)
    out = [f"**{title}**", ""] if title else []
    out += ["| category | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in _ordered(rows):
        cells = [_percent(rows[name].get(c)) for c in columns]
        label = f"**{name}**" if name == MEAN_ROW else name
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_csv(path: str | os.PathLike, rows: dict[str, dict[str, float]]) -> None:
    """Write fractions (not percent), one row per category, `mean` last; NaN as "nan"; atomic replace.

    Args:
        path: destination file; parent folders are created.
        rows: {category: {metric: fraction}}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["category", *columns])
            for name in _ordered(rows):
                values = (rows[name].get(c, math.nan) for c in columns)
                writer.writerow([name, *("nan" if math.isnan(v) else repr(float(v)) for v in values)])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_csv(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a table written by `write_csv`.

    Args:
        path: a `metrics.csv`.

    Returns:
        {category: {metric: fraction}} in file order.
    """
    with open(path, newline="") as handle:
        return {row.pop("category"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)}
