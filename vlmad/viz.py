"""Pure visualisation helpers (numpy / PIL only): map normalisation, jet colouring, overlay panels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

# Anchors of matplotlib's "jet": dark blue -> blue -> cyan -> yellow -> red -> dark red.
_JET_ANCHORS = np.array(
    [
        [0.0, 0.0, 0.0, 0.5],
        [0.11, 0.0, 0.0, 1.0],
        [0.125, 0.0, 0.0, 1.0],
        [0.34, 0.0, 0.86, 1.0],
        [0.35, 0.0, 0.9, 0.97],
        [0.64, 1.0, 1.0, 0.0],
        [0.65, 1.0, 0.95, 0.0],
        [0.89, 1.0, 0.0, 0.0],
        [0.91, 1.0, 0.0, 0.0],
        [1.0, 0.5, 0.0, 0.0],
    ]
)
_LUT_SIZE = 256
_JET_LUT = np.stack(
    [np.interp(np.linspace(0, 1, _LUT_SIZE), _JET_ANCHORS[:, 0], _JET_ANCHORS[:, ch]) for ch in (1, 2, 3)],
    axis=1,
)
_JET_LUT = np.round(_JET_LUT * 255).astype(np.uint8)  # (256, 3)


def _to_numpy(array: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def normalize_map(anomaly_map: np.ndarray | Tensor, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Rescale a map to [0, 1] for display.

    Pass fixed `vmin`/`vmax` (e.g. 0 and 1) to compare maps across images; the default min-max stretch
    makes every map look anomalous somewhere.

    Args:
        anomaly_map: (H, W) scores.
        vmin: value mapped to 0 (default: map minimum).
        vmax: value mapped to 1 (default: map maximum).

    Returns:
        (H, W) float32 in [0, 1]; zeros for a constant map.
    """
    values = _to_numpy(anomaly_map).astype(np.float32)
    low = float(values.min()) if vmin is None else vmin
    high = float(values.max()) if vmax is None else vmax
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def denormalize_image(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo CLIP normalisation.

    Args:
        image: (3, H, W) normalised image.
        mean: per-channel mean used by the transform.
        std: per-channel std used by the transform.

    Returns:
        (H, W, 3) uint8.
    """
    pixels = _to_numpy(image).astype(np.float32)
    pixels = pixels * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)


def colorize(map01: np.ndarray) -> np.ndarray:
    """Jet colouring of a [0, 1] map.

    Args:
        map01: (H, W) values in [0, 1] (clipped).

    Returns:
        (H, W, 3) uint8.
    """
    index = np.round(np.clip(_to_numpy(map01), 0.0, 1.0) * (_LUT_SIZE - 1)).astype(np.int64)
    return _JET_LUT[index]


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with at least one 4-neighbour outside it."""
    padded = np.pad(mask, 1, mode="constant")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_panel(
    image_u8: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, alpha: float = 0.5
) -> np.ndarray:
    """Side-by-side panel: image | heatmap blended on the image | ground truth.

    Args:
        image_u8: (H, W, 3) uint8.
        anomaly_map: (H, W) map already in [0, 1] (see `normalize_map`).
        mask: (H, W) {0, 1} or None (no ground truth: the third column is the plain image).
        alpha: heatmap weight in the blend.

    Returns:
        (H, 3W, 3) uint8.
    """
    image = np.asarray(image_u8, dtype=np.uint8)
    heat = colorize(anomaly_map)
    if heat.shape != image.shape:
        raise ValueError(f"map {heat.shape[:2]} and image {image.shape[:2]} must have the same size")
    blend = (alpha * heat.astype(np.float32) + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)
    truth = image.copy()
    if mask is not None:
        region = _to_numpy(mask) != 0
        # Tint the defect red and draw its outline so small defects stay visible.
        tinted = 0.5 * truth[region].astype(np.float32) + 0.5 * np.array([255.0, 0.0, 0.0])
        truth[region] = tinted.round().astype(np.uint8)
        truth[_mask_outline(region)] = (255, 0, 0)
    return np.concatenate([image, blend, truth], axis=1)


def save_png(path: str | os.PathLike, array_u8: np.ndarray) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array_u8, dtype=np.uint8)).save(path)
