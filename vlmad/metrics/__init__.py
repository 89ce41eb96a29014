"""Anomaly-detection metrics: AUROC, AP, F1-max, AUPRO (official and legacy) and result tables.

Names are imported lazily (PEP 562): the tables (``vlmad.metrics.table``) read and write CSVs without torch, so
``vlmad report`` never imports it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from vlmad._lazy import lazy_exports

_EXPORTS = {
    "AnomalyMetrics": "anomaly_metrics",
    "binary_curve_metrics": "anomaly_metrics",
    "aupro": "aupro",
    "aupro_legacy": "aupro",
    "label_regions": "aupro",
    "pixel_metrics": "aupro",
    "pro_curve": "aupro",
    "sort_pixels": "aupro",
    "METRIC_NAMES": "names",
    "UndefinedMetricWarning": "names",
    "format_markdown": "table",
    "format_table": "table",
    "read_csv": "table",
    "summarise": "table",
    "write_csv": "table",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """``aupro`` is a submodule and its main function: the package attribute stays the function, as before."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)  # the import system binds the submodule here once it has loaded
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
