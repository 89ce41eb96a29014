"""Anomaly detection methods: plain torch modules on an injected backbone (ClipBackbone or DinoBackbone).

Each method is imported on first use (PEP 562), so using one does not load the others.
"""

from __future__ import annotations

from vlmad._lazy import lazy_exports

_EXPORTS = {
    "AnomalyMethod": "base",
    "Prediction": "base",
    "AnomalyCLIP": "anomalyclip",
    "AnomalyDINO": "anomalydino",
    "AprilGAN": "aprilgan",
    "MuSc": "musc",
    "SubspaceAD": "subspacead",
    "WinCLIP": "winclip",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
