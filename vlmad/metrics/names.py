"""Metric names and the undefined-metric warning, torch-free (tables and sweep reports read CSVs without torch)."""

from __future__ import annotations

METRIC_NAMES: list[str] = [
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
]


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for a category (one class only) and left out of the mean."""
