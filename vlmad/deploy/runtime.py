"""Run an exported model without PyTorch: numpy + PIL + onnxruntime or openvino.

    from vlmad import deploy
    model = deploy.load("exports/bottle", backend="onnx")       # or "openvino"
    result = model.predict_files(["a.png", "b.png"])            # scores, maps, OK/NG at the stored thresholds

The folder is what ``vlmad export`` writes: the model file(s) and ``vlmad_model.json``. Images are
preprocessed exactly as training and evaluation do (``vlmad.data.transforms.Preprocess`` with the squash
resize): RGB, PIL bicubic resize to S x S, [0, 1], CLIP mean/std. This module must never import torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Both torch-free (numpy + PIL, stdlib): the image reading is the datamodule's own.
from vlmad.data.imageio import open_rgb, to_rgb
from vlmad.errors import VlmadError

MANIFEST = "vlmad_model.json"
BACKENDS = ("onnx", "openvino")


class DeployError(VlmadError, ValueError):
    """A bad export folder, image or setting; the message names the file and the problem."""


# ------------------------------------------------------------------ images
def load_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB exactly as the datamodule does (any PIL mode: 16-bit, float, alpha, ...).

    Raises:
        vlmad.data.imageio.ImageReadError (a ValueError): unreadable file; the message names it.
    """
    return open_rgb(path)


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One image -> (3, S, S) float32 normalised, equal to ``Preprocess(size, mean, std)(image, None)[0]``.

    Args:
        image: PIL image of any size and mode (converted to RGB by the datamodule's rules first).
        size: model input side S.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std.
    """
    image = to_rgb(image)
    pixels = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0  # (S, S, 3)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels.transpose(2, 0, 1) - mean_a) / std_a


# ------------------------------------------------------------------ model
@dataclass
class Result:
    """Outputs for a batch of images.

    Attributes:
        scores: (B,) image anomaly scores.
        maps: (B, S, S) pixel anomaly scores at the model's resolution.
        anomalous: (B,) bool OK/NG decisions at the stored threshold, or None without thresholds.
        masks: (B, S, S) bool maps above the pixel threshold, or None without thresholds.
    """

    scores: np.ndarray
    maps: np.ndarray
    anomalous: np.ndarray | None
    masks: np.ndarray | None


class _OnnxRunner:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(["pred_score", "anomaly_map"], {"images": images})
        return scores, maps


class _OpenVinoRunner:
    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        # f32 on every CPU: the plugin's default is bf16 where the CPU supports it, which breaks parity.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.model = ov.Core().compile_model(str(path), "CPU", config)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.model(images)
        return out[self.model.output("pred_score")], out[self.model.output("anomaly_map")]


class DeployedModel:
    """An export folder loaded for one backend.

    Attributes:
        info: the parsed ``vlmad_model.json``.
        thresholds: ``image_threshold``/``pixel_threshold`` (+ how they were calibrated), or None.
    """

    def __init__(self, folder: str | Path, backend: str = "onnx", threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.info = read_manifest(self.folder)
        if backend not in BACKENDS:
            raise DeployError(f"unknown backend {backend!r} (expected one of {BACKENDS})")
        name = self.info.get("files", {}).get(backend)
        if name is None or not (self.folder / name).is_file():
            have = ", ".join(self.info.get("files", {})) or "none"
            raise DeployError(
                f"{self.folder} has no {backend} model (exported formats: {have}); re-export with "
                f"format={backend} or format=both"
            )
        self.backend = backend
        self._run = (_OnnxRunner if backend == "onnx" else _OpenVinoRunner)(self.folder / name, threads)
        pre = self.info["preprocess"]
        self.image_size, self.mean, self.std = int(pre["image_size"]), pre["mean"], pre["std"]
        self.thresholds: dict[str, Any] | None = self.info.get("thresholds")
        self.threshold_use: str = self.info.get("threshold_use", "score")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (3, S, S) float32 model input."""
        return preprocess(image, self.image_size, self.mean, self.std)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed (B, 3, S, S) images -> scores (B,), maps (B, S, S), as ``method.forward``."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise DeployError(f"images must be (B, 3, {s}, {s}) float32, got {images.shape}")
        scores, maps = self._run(images)
        return np.asarray(scores), np.asarray(maps)

    def decide(self, scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(B,) NG decisions and (B, S, S) masks at the stored thresholds (None, None without thresholds)."""
        if self.thresholds is None:
            return None, None
        masks = maps > float(self.thresholds["pixel_threshold"])
        if self.threshold_use == "pixel":
            return maps.reshape(len(maps), -1).max(axis=1) > float(self.thresholds["pixel_threshold"]), masks
        return scores > float(self.thresholds["image_threshold"]), masks

    def predict(self, images: Iterable[Image.Image]) -> Result:
        """Score PIL images (any size and mode) in one batch."""
        batch = np.stack([self.preprocess(img) for img in images])
        scores, maps = self.run(batch)
        anomalous, masks = self.decide(scores, maps)
        return Result(scores=scores, maps=maps, anomalous=anomalous, masks=masks)

    def predict_files(self, paths: Iterable[str | Path]) -> Result:
        """Read and score image files in one batch; DeployError naming an unreadable file."""
        return self.predict([load_image(p) for p in paths])


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The parsed ``vlmad_model.json`` of an export folder; DeployError if missing or malformed."""
    path = Path(folder) / MANIFEST
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(
            f"cannot read {path}: {err} (is {folder} a folder written by vlmad export?)"
        ) from err
    missing = [k for k in ("preprocess", "files", "inputs", "outputs") if k not in info]
    if missing:
        raise DeployError(f"{path} lacks {missing}; re-export with this vlmad version")
    return info


def load(folder: str | Path, backend: str = "onnx", threads: int | None = None) -> DeployedModel:
    """Load an export folder for ``backend`` (``onnx`` or ``openvino``) with ``threads`` CPU threads (None = all)."""
    return DeployedModel(folder, backend, threads)


def calibrate(model: DeployedModel, batches: Iterable[np.ndarray], quantile: float) -> dict[str, Any]:
    """Thresholds from NORMAL images, as ``vlmad.outputs.predictions.calibrate_threshold`` (``higher`` quantile).

    Args:
        model: a loaded export.
        batches: preprocessed (B, 3, S, S) normal images.
        quantile: in (0, 1].
    """
    if not 0.0 < quantile <= 1.0:
        raise DeployError(f"quantile must be in (0, 1], got {quantile}")
    outputs = [model.run(b) for b in batches]
    if not outputs:
        raise DeployError("no normal images to calibrate on")
    scores = np.concatenate([s for s, _ in outputs])
    return {
        "image_threshold": float(np.quantile(scores, quantile, method="higher")),
        "pixel_threshold": float(
            np.quantile(np.concatenate([m.ravel() for _, m in outputs]), quantile, method="higher")
        ),
        "quantile": float(quantile),
        "n_normal_images": len(scores),
    }
