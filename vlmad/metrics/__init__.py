"""Anomaly-detection metrics: AUROC, AP, F1-max, AUPRO (official and legacy) and result tables."""

from vlmad.metrics.anomaly_metrics import METRIC_NAMES, AnomalyMetrics, binary_curve_metrics
from vlmad.metrics.aupro import aupro, aupro_legacy, label_regions, pixel_metrics, pro_curve, sort_pixels
from vlmad.metrics.table import format_markdown, format_table, read_csv, summarise, write_csv

__all__ = [
    "METRIC_NAMES",
    "AnomalyMetrics",
    "aupro",
    "aupro_legacy",
    "binary_curve_metrics",
    "format_markdown",
    "format_table",
    "label_regions",
    "pixel_metrics",
    "pro_curve",
    "read_csv",
    "sort_pixels",
    "summarise",
    "write_csv",
]
