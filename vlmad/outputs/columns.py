"""Which columns a sweep table shows and how a cell reads; shared by the text and the HTML reports."""

from __future__ import annotations

import math
import re
from typing import Any

from vlmad.metrics.table import percent

GROUP_FIELDS = (
    "member",  # a comparison's member label (None outside comparisons: then never shown)
    "experiment",
    "method",
    "eval_set",
    "eval_root",
    "eval_categories",
    "fit_set",
    "fit_root",
    "max_epochs",
    "k_shot",
    "backbone",
    "pretrained",
    "image_size",
    "pixel_size",
    "mask_resize",
    "aupro_mode",
    "published",
    "extra",
)
ALWAYS_SHOWN = ("method", "eval_set", "k_shot")


def natural_key(value: Any) -> tuple:
    """Sort key putting ``k_shot`` 2 before 10 and ``2_seed=1`` before ``10_seed=0``: digit runs compare as numbers."""
    parts = re.split(r"(\d+(?:\.\d+)?)", "" if value is None else str(value))
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts) if p)


def cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "" if column.endswith("(paper)") else "n/a"
    if not isinstance(value, float):
        return str(value)
    std = row.get(column.replace(" (paper)", "_std (paper)") if column.endswith("(paper)") else f"{column}_std")
    return percent(value, std)


def display_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(group columns worth showing: always-shown ones and those that vary, metric columns)."""
    varying = [f for f in GROUP_FIELDS if f in ALWAYS_SHOWN or len({str(r.get(f)) for r in rows}) > 1]
    metrics = [k for k in dict.fromkeys(k for r in rows for k in r) if isinstance(k, str)]
    metrics = [k for k in metrics if k not in GROUP_FIELDS and k not in ("category", "n", "seeds")]
    return [*varying, "category", "n"], [k for k in metrics if "_std" not in k]
