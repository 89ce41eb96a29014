"""vlmad: zero- and few-shot industrial anomaly detection with vision-language models."""

__version__ = "0.1.0"
