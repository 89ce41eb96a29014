"""Anomaly detection methods: plain torch modules on an injected ClipBackbone."""

from vlmad.methods.base import AnomalyMethod, Prediction

__all__ = ["AnomalyMethod", "Prediction"]
