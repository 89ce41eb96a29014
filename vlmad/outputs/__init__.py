"""Outputs layer: predictions and thresholds, heatmap panels, run and sweep reports (CSV, markdown, HTML), loggers."""
