"""vlmad: zero- and few-shot industrial anomaly detection with vision-language models.

The public API is imported lazily (PEP 562): ``import vlmad`` loads neither torch nor Lightning, so the
torch-free runtime :mod:`vlmad.deploy` and ``vlmad report`` stay light.

    from vlmad import ClipBackbone, WinCLIP
    method = WinCLIP(ClipBackbone("vlmad-tiny", pretrained=None, image_size=64), k_shot=0)
"""

from __future__ import annotations

from vlmad._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "AnomalyCLIP": "vlmad.methods",
    "AnomalyMethod": "vlmad.methods",
    "AprilGAN": "vlmad.methods",
    "MuSc": "vlmad.methods",
    "Prediction": "vlmad.methods",
    "WinCLIP": "vlmad.methods",
    "ClipBackbone": "vlmad.backbones",
    "AnomalyDataModule": "vlmad.data",
    "AnomalyModule": "vlmad.engine.module",
    "evaluate": "vlmad.engine.run",
    "train": "vlmad.engine.run",
    "compose": "vlmad.config",
    "CONF_DIR": "vlmad.config",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
