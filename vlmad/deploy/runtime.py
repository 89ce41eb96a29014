"""Run an exported model without PyTorch: numpy + PIL + onnxruntime or openvino.

    from vlmad import deploy
    model = deploy.load("exports/bottle", backend="onnx")       # or "openvino" (device="CPU" | "GPU" | "AUTO")
    result = model.predict_files(["a.png", "b.png"])            # scores, maps, OK/NG at the stored thresholds

The folder is what ``vlmad export`` writes: the model file(s) and ``vlmad_model.json``. Loading checks the folder
before anything runs: the manifest's fields (types and ranges, one line per problem), its checksum (so the
preprocessing constants and thresholds are the ones exported) and every model file's sha256 (so a model file
copied from another export is refused). Images are preprocessed exactly as training and evaluation do
(``vlmad.data.transforms.Preprocess`` with the squash resize): RGB, PIL bicubic resize to S x S, [0, 1], CLIP
mean/std. This module must never import torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Both torch-free (numpy + PIL, stdlib): the image reading is the datamodule's own.
from vlmad.data.imageio import open_rgb, to_rgb
from vlmad.errors import VlmadError
from vlmad.io import atomic_write

MANIFEST = "vlmad_model.json"
BACKENDS = ("onnx", "openvino")
FORMAT_VERSION = 2  # 2: model files' sha256 and the manifest checksum
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_score", "anomaly_map")
CHECKSUM_KEY = "manifest_sha256"
BATCH_SIZE = 8  # images read, preprocessed and scored at a time by predict_files
MAP_SIZES = ("model", "image")


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


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(src.astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (src - low).astype(np.float32)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map, equal to ``F.interpolate(..., mode="bilinear", align_corners=False)``.

    Args:
        anomaly_map: (h, w) float scores.
        size: target (H, W), e.g. the image's own size.

    Returns:
        (H, W) float32.
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    y0, y1, wy = _source_index(int(size[0]), values.shape[0])
    x0, x1, wx = _source_index(int(size[1]), values.shape[1])
    rows = values[y0] * (1 - wy)[:, None] + values[y1] * wy[:, None]  # (H, w)
    return (rows[:, x0] * (1 - wx)[None] + rows[:, x1] * wx[None]).astype(np.float32)


# ------------------------------------------------------------------ manifest
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_checksum(info: dict[str, Any]) -> str:
    """sha256 of the manifest's content (every key but the checksum itself, canonical JSON)."""
    body = {k: v for k, v in info.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def backend_files(info: dict[str, Any], backend: str) -> list[str]:
    """The files ``backend`` reads: ``model.onnx``, or ``model.xml`` and its weights ``model.bin``."""
    name = info["files"][backend]
    return [name, str(Path(name).with_suffix(".bin"))] if backend == "openvino" else [name]


def basic_manifest(image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """The fields the runtime reads, for an input of (B, 3, S, S) images; ``files`` is filled by the writer."""
    s = int(image_size)
    return {
        "format_version": FORMAT_VERSION,
        "preprocess": {
            "image_size": s,
            "resize": "squash",
            "interpolation": "bicubic",
            "color": "RGB",
            "scale": 1 / 255,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        },
        "thresholds": None,
        "threshold_use": "score",
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, s, s], "dtype": "float32"}],
        "outputs": [
            {"name": OUTPUT_NAMES[0], "shape": ["batch"], "dtype": "float32"},
            {"name": OUTPUT_NAMES[1], "shape": ["batch", s, s], "dtype": "float32"},
        ],
        "files": {},
    }


def write_manifest(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``vlmad_model.json`` with the sha256 of every model file in ``info["files"]`` and the checksum.

    Args:
        folder: the export folder, already holding the model files.
        info: the manifest (``basic_manifest`` plus anything a reader wants to know).

    Returns:
        The manifest's path.
    """
    folder = Path(folder)
    info = json.loads(json.dumps(info, default=str))  # what a reader will parse, so the checksum matches it
    info["sha256"] = {
        name: sha256_file(folder / name) for backend in info["files"] for name in backend_files(info, backend)
    }
    info[CHECKSUM_KEY] = manifest_checksum(info)
    return atomic_write(folder / MANIFEST, json.dumps(info, indent=2) + "\n")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape_problem(name: str, got: Any, want: list) -> list[str]:
    return [] if got == want else [f"{name} must be {want}, got {got!r}"]


def validate_manifest(info: Any) -> list[str]:
    """Every problem of a parsed manifest, one line each (empty when the runtime can use it)."""
    if not isinstance(info, dict):
        return [f"the manifest must be a JSON object, got {type(info).__name__}"]
    if info.get("format_version") != FORMAT_VERSION:
        return [
            f"format_version {info.get('format_version')!r}: this runtime reads format {FORMAT_VERSION} "
            "(model sha256 and a manifest checksum); re-export with this vlmad version"
        ]
    problems = []
    pre = info.get("preprocess")
    size = pre.get("image_size") if isinstance(pre, dict) else None
    if not isinstance(pre, dict):
        problems.append("preprocess must be an object")
        pre = {}
    elif not (isinstance(size, int) and not isinstance(size, bool) and 16 <= size <= 4096):
        problems.append(f"preprocess.image_size must be an integer in 16..4096, got {size!r}")
        size = None
    for key, low in (("mean", 0.0), ("std", 0.0)):
        value = pre.get(key)
        ok = isinstance(value, list) and len(value) == 3 and all(_number(v) for v in value)
        ok = ok and all((v > low if key == "std" else 0.0 <= v <= 1.0) for v in value)
        if pre and not ok:
            rule = "3 numbers > 0" if key == "std" else "3 numbers in [0, 1]"
            problems.append(f"preprocess.{key} must be {rule}, got {value!r}")
    fixed = {"resize": "squash", "interpolation": "bicubic", "color": "RGB"}
    problems += [
        f"preprocess.{k} must be {v!r}, got {pre.get(k)!r}" for k, v in fixed.items() if pre and pre.get(k) != v
    ]
    if pre and not (_number(pre.get("scale")) and abs(pre["scale"] - 1 / 255) < 1e-9):
        problems.append(f"preprocess.scale must be 1/255, got {pre.get('scale')!r}")
    files = info.get("files")
    if (
        not isinstance(files, dict)
        or not files
        or any(
            k not in BACKENDS or not isinstance(v, str) or Path(v).name != v or v in ("", ".", "..")
            for k, v in files.items()
        )
    ):
        problems.append(f"files must map {' / '.join(BACKENDS)} to a file name in the folder, got {files!r}")
    sha = info.get("sha256")
    if not isinstance(sha, dict) or any(not isinstance(v, str) or len(v) != 64 for v in sha.values()):
        problems.append("sha256 must map each model file to its 64-hex-digit sha256")
    thresholds = info.get("thresholds")
    if thresholds is not None:
        keys = ("image_threshold", "pixel_threshold")
        if not isinstance(thresholds, dict) or any(not _number(thresholds.get(k)) for k in keys):
            got = {k: thresholds.get(k) for k in keys} if isinstance(thresholds, dict) else thresholds
            problems.append(f"thresholds must be null or hold finite numbers {list(keys)}, got {got!r}")
    if info.get("threshold_use", "score") not in ("score", "pixel"):
        problems.append(f"threshold_use must be 'score' or 'pixel', got {info.get('threshold_use')!r}")
    inputs, outputs = info.get("inputs"), info.get("outputs")
    if size is not None:
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            problems.append(f"inputs must be one entry named {INPUT_NAME!r}, got {inputs!r}")
        else:
            problems += _shape_problem("inputs[0].name", inputs[0].get("name"), INPUT_NAME)  # type: ignore[arg-type]
            problems += _shape_problem(
                f"inputs[0].shape (preprocess.image_size is {size})", inputs[0].get("shape"), ["batch", 3, size, size]
            )
        if not isinstance(outputs, list) or [o.get("name") if isinstance(o, dict) else o for o in outputs] != list(
            OUTPUT_NAMES
        ):
            problems.append(f"outputs must be named {list(OUTPUT_NAMES)}, got {outputs!r}")
        else:
            problems += _shape_problem(
                f"outputs[1].shape (preprocess.image_size is {size})", outputs[1].get("shape"), ["batch", size, size]
            )
    if info.get(CHECKSUM_KEY) != manifest_checksum(info):
        problems.append(
            f"{CHECKSUM_KEY} does not match the content: the manifest was edited after export (preprocessing and "
            "thresholds must be the exported ones; give other thresholds to vlmad predict, or re-export)"
        )
    return problems


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The parsed and validated ``vlmad_model.json`` of an export folder.

    Raises:
        DeployError: missing, unparsable or invalid manifest; one line per problem, each naming the file.
    """
    path = Path(folder) / MANIFEST
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(f"cannot read {path}: {err} (is {folder} a folder written by vlmad export?)") from err
    problems = validate_manifest(info)
    if problems:
        raise DeployError("\n".join(f"{path}: {p}" for p in problems))
    return info


def check_files(folder: str | Path, info: dict[str, Any], backend: str) -> None:
    """Every file ``backend`` reads exists and has the sha256 the manifest records; DeployError naming it if not."""
    folder = Path(folder)
    for name in backend_files(info, backend):
        path = folder / name
        if not path.is_file():
            raise DeployError(f"{path} is missing (listed in {folder / MANIFEST}); re-export")
        want = info["sha256"].get(name)
        if want is None:
            raise DeployError(f"{folder / MANIFEST} records no sha256 for {name}; re-export")
        if sha256_file(path) != want:
            raise DeployError(
                f"{path} is not the file this export wrote (sha256 differs from {folder / MANIFEST}): a model file "
                "from another export or a partial write; re-export into this folder"
            )


# ------------------------------------------------------------------ model
@dataclass
class Result:
    """Outputs for a batch of images.

    Attributes:
        scores: (B,) image anomaly scores.
        maps: (B, S, S) pixel anomaly scores at the model's resolution; with ``map_size="image"`` a list of
            (H_i, W_i) maps at each image's own size.
        anomalous: (B,) bool OK/NG decisions at the stored threshold, or None without thresholds.
        masks: (B, S, S) bool maps above the pixel threshold (a list of (H_i, W_i) with ``map_size="image"``),
            or None without thresholds.
        sizes: each image's own (H, W), or None when not known.
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    anomalous: np.ndarray | None
    masks: np.ndarray | list[np.ndarray] | None
    sizes: list[tuple[int, int]] | None = None


ONNX_PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "GPU": "CUDAExecutionProvider"}


class _OnnxRunner:
    def __init__(self, path: Path, threads: int | None, device: str | None) -> None:
        import onnxruntime as ort

        device = (device or "CPU").upper()
        provider = ONNX_PROVIDERS.get(device)
        available = ort.get_available_providers()
        if provider is None or provider not in available:
            raise DeployError(
                f"onnxruntime cannot run on device {device!r} here (devices: CPU, CUDA; providers installed: "
                f"{', '.join(available)})"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def input_shape(self) -> list:
        return list(self.session.get_inputs()[0].shape)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return scores, maps


class _OpenVinoRunner:
    def __init__(self, path: Path, threads: int | None, device: str | None) -> None:
        import openvino as ov

        core = ov.Core()
        device = (device or "CPU").upper()
        virtual = device.split(":")[0] in ("AUTO", "MULTI", "HETERO")
        if not virtual and device not in core.available_devices:
            raise DeployError(
                f"OpenVINO has no device {device!r} here (available: {', '.join(core.available_devices)}, "
                "or AUTO to let OpenVINO choose)"
            )
        # f32 everywhere: the plugins' default is bf16/f16 where the hardware supports it, which breaks parity.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.model = core.compile_model(str(path), device, config)

    def input_shape(self) -> list:
        return [d.get_length() if d.is_static else "batch" for d in self.model.input(0).get_partial_shape()]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.model(images)
        return out[self.model.output(OUTPUT_NAMES[0])], out[self.model.output(OUTPUT_NAMES[1])]


class DeployedModel:
    """An export folder loaded for one backend.

    Args:
        folder: written by ``vlmad export``.
        backend: ``onnx`` or ``openvino``.
        threads: CPU threads (None = the runtime's default, all cores).
        device: where the model runs: ``CPU`` (default); OpenVINO: any of its devices (``GPU``, ``NPU``, ...)
            or ``AUTO`` to let it choose; onnxruntime: ``CUDA`` where its GPU package is installed.
        batch_size: images read, preprocessed and scored at a time by ``predict_files`` / ``predict``.

    Attributes:
        info: the parsed ``vlmad_model.json``.
        thresholds: ``image_threshold``/``pixel_threshold`` (+ how they were calibrated), or None.
    """

    def __init__(
        self,
        folder: str | Path,
        backend: str = "onnx",
        threads: int | None = None,
        device: str | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.folder = Path(folder)
        if backend not in BACKENDS:
            raise DeployError(f"unknown backend {backend!r} (expected one of {BACKENDS})")
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise DeployError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.info = read_manifest(self.folder)
        name = self.info["files"].get(backend)
        if name is None:
            have = ", ".join(self.info["files"]) or "none"
            raise DeployError(
                f"{self.folder} has no {backend} model (exported formats: {have}); re-export with "
                f"format={backend} or format=both"
            )
        check_files(self.folder, self.info, backend)
        self.backend, self.device, self.batch_size = backend, (device or "CPU").upper(), batch_size
        try:
            self._run = (_OnnxRunner if backend == "onnx" else _OpenVinoRunner)(self.folder / name, threads, device)
        except DeployError:
            raise
        except Exception as err:  # the runtime's own message, on one line, naming the file
            text = " ".join(str(err).split())[:500]
            raise DeployError(f"{backend} cannot load {self.folder / name}: {text}") from err
        pre = self.info["preprocess"]
        self.image_size, self.mean, self.std = int(pre["image_size"]), pre["mean"], pre["std"]
        shape = self._run.input_shape()
        if [str(d) for d in shape[1:]] != ["3", str(self.image_size), str(self.image_size)]:
            raise DeployError(
                f"{self.folder / name} takes input {shape}, but {self.folder / MANIFEST} says image_size "
                f"{self.image_size}: the model and manifest come from different exports; re-export"
            )
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
        if len(images) == 0:
            return np.zeros(0, np.float32), np.zeros((0, s, s), np.float32)
        scores, maps = self._run(images)
        return np.asarray(scores), np.asarray(maps)

    def decide(self, scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(B,) NG decisions and (B, S, S) masks at the stored thresholds (None, None without thresholds)."""
        if self.thresholds is None:
            return None, None
        masks = maps > float(self.thresholds["pixel_threshold"])
        if self.threshold_use == "pixel":
            peak = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, bool)
            return peak > float(self.thresholds["pixel_threshold"]), masks
        return scores > float(self.thresholds["image_threshold"]), masks

    def _result(self, batch: list[np.ndarray], sizes: list[tuple[int, int]], map_size: str) -> Result:
        s = self.image_size
        scores, maps = self.run(np.stack(batch) if batch else np.zeros((0, 3, s, s), np.float32))
        anomalous, masks = self.decide(scores, maps)
        if map_size == "model":
            return Result(scores=scores, maps=maps, anomalous=anomalous, masks=masks, sizes=sizes)
        full = [resize_map(m, hw) for m, hw in zip(maps, sizes, strict=True)]
        full_masks = None if masks is None else [m > float(self.thresholds["pixel_threshold"]) for m in full]
        return Result(scores=scores, maps=full, anomalous=anomalous, masks=full_masks, sizes=sizes)

    def _check_options(self, batch_size: int | None, map_size: str) -> int:
        if map_size not in MAP_SIZES:
            raise DeployError(f"map_size must be one of {MAP_SIZES}, got {map_size!r}")
        size = self.batch_size if batch_size is None else batch_size
        if not (isinstance(size, int) and size > 0):
            raise DeployError(f"batch_size must be a positive integer, got {size!r}")
        return size

    def predict(self, images: Iterable[Image.Image], batch_size: int | None = None, map_size: str = "model") -> Result:
        """Score PIL images (any size and mode), ``batch_size`` at a time.

        Args:
            images: PIL images.
            batch_size: images per model call (None = the model's ``batch_size``).
            map_size: ``model`` (maps (B, S, S)) or ``image`` (each map resized bilinearly to its image's size).
        """
        size = self._check_options(batch_size, map_size)
        parts, batch, sizes = [], [], []
        for image in images:
            batch.append(self.preprocess(image))
            sizes.append((image.height, image.width))
            if len(batch) == size:
                parts.append(self._result(batch, sizes, map_size))
                batch, sizes = [], []
        if batch or not parts:
            parts.append(self._result(batch, sizes, map_size))
        return concat_results(parts)

    def predict_batches(
        self, paths: Iterable[str | Path], batch_size: int | None = None, map_size: str = "model"
    ) -> Iterator[tuple[list[Path], Result]]:
        """Read and score image files ``batch_size`` at a time: memory stays bounded for any number of files.

        Yields:
            the batch's paths and their Result.

        Raises:
            DeployError: an unreadable file (the message names it), a bad option.
        """
        size = self._check_options(batch_size, map_size)
        batch: list[Path] = []
        for path in paths:
            batch.append(Path(path))
            if len(batch) == size:
                yield batch, self.predict([_read(p) for p in batch], size, map_size)
                batch = []
        if batch:
            yield batch, self.predict([_read(p) for p in batch], size, map_size)

    def predict_files(
        self, paths: Iterable[str | Path], batch_size: int | None = None, map_size: str = "model"
    ) -> Result:
        """Read and score image files in bounded batches (``predict_batches``); an empty list gives an empty Result.

        Raises:
            DeployError: an unreadable file (the message names it), a bad option.
        """
        parts = [r for _, r in self.predict_batches(paths, batch_size, map_size)]
        return concat_results(parts) if parts else self.predict([], batch_size, map_size)


def _read(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except (ValueError, OSError, Image.DecompressionBombError) as err:  # ImageReadError is a ValueError
        text = str(err) if str(path) in str(err) else f"cannot read image {path}: {err}"
        raise DeployError(text) from err


def concat_results(parts: Sequence[Result]) -> Result:
    """One Result from the Results of consecutive batches."""
    first = parts[0]

    def join(values: list) -> Any:
        if values[0] is None:
            return None
        return [m for v in values for m in v] if isinstance(values[0], list) else np.concatenate(values)

    sizes = None if first.sizes is None else [hw for p in parts for hw in (p.sizes or [])]
    return Result(
        scores=np.concatenate([p.scores for p in parts]),
        maps=join([p.maps for p in parts]),
        anomalous=join([p.anomalous for p in parts]),
        masks=join([p.masks for p in parts]),
        sizes=sizes,
    )


def load(
    folder: str | Path,
    backend: str = "onnx",
    threads: int | None = None,
    device: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> DeployedModel:
    """Load an export folder for ``backend`` (``onnx`` or ``openvino``); see :class:`DeployedModel` for the rest."""
    return DeployedModel(folder, backend, threads, device, batch_size)


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
    if not outputs or not sum(len(s) for s, _ in outputs):
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
