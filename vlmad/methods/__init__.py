"""Anomaly detection methods: plain torch modules on an injected ClipBackbone.

Each method is imported on first use (PEP 562), so using one does not load the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnomalyMethod": "base",
    "Prediction": "base",
    "AnomalyCLIP": "anomalyclip",
    "AprilGAN": "aprilgan",
    "MuSc": "musc",
    "WinCLIP": "winclip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlmad.methods' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vlmad.methods.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
