"""Dataset readers, preprocessing and the DataModule."""

from vlmad.data.datamodule import AnomalyDataModule
from vlmad.data.dataset import AnomalyDataset, load_image, load_mask
from vlmad.data.folder import Folder
from vlmad.data.mvtec import MVTec
from vlmad.data.records import DataError, Reader, Record
from vlmad.data.synthetic import MVTEC_CATEGORIES, VISA_CATEGORIES, Synthetic, generate
from vlmad.data.transforms import Preprocess
from vlmad.data.visa import VisA

__all__ = [
    "MVTEC_CATEGORIES",
    "VISA_CATEGORIES",
    "AnomalyDataModule",
    "AnomalyDataset",
    "DataError",
    "Folder",
    "MVTec",
    "Preprocess",
    "Reader",
    "Record",
    "Synthetic",
    "VisA",
    "generate",
    "load_image",
    "load_mask",
]
