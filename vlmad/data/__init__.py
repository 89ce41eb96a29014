"""Dataset readers, preprocessing and the DataModule.

Names are imported lazily (PEP 562), so torch-free submodules such as ``vlmad.data.imageio`` and
``vlmad.data.records`` can be used without importing torch or Lightning.
"""

from __future__ import annotations

from vlmad._lazy import lazy_exports

_EXPORTS = {
    "AnomalyDataModule": "datamodule",
    "AnomalyDataset": "dataset",
    "load_image": "dataset",
    "load_mask": "dataset",
    "Folder": "folder",
    "ImageReadError": "imageio",
    "open_rgb": "imageio",
    "to_rgb": "imageio",
    "MVTec": "mvtec",
    "DataError": "records",
    "Reader": "records",
    "Record": "records",
    "MVTEC_CATEGORIES": "synthetic",
    "VISA_CATEGORIES": "synthetic",
    "Synthetic": "synthetic",
    "generate": "synthetic",
    "Preprocess": "transforms",
    "VisA": "visa",
    "DataWarning": "validate",
    "validate_data": "validate",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
