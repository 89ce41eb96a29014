"""Pure visualisation helpers (numpy / PIL only): map normalisation, jet colouring, labelled panels, panel choice."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # torch-free at run time: vlmad predict with an exported model runs where torch is absent
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
JET_LUT = np.stack(
    [np.interp(np.linspace(0, 1, _LUT_SIZE), _JET_ANCHORS[:, 0], _JET_ANCHORS[:, ch]) for ch in (1, 2, 3)],
    axis=1,
)
JET_LUT = np.round(JET_LUT * 255).astype(np.uint8)  # (256, 3)


def _to_numpy(array: np.ndarray | Tensor) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch Tensor
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
    return JET_LUT[index]


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


# ----------------------------------------------------------------------------------------------- panels
PANEL_LONGEST = 256  # display size of a panel tile's longer side (the image's aspect ratio is kept)
PANEL_GAP, PANEL_BAR = 4, 90  # pixels between tiles; width of the colour bar column with its numbers
_TEXT = (20, 20, 20)
_GT_COLOUR = (255, 0, 0)
_PRED_COLOUR = (0, 230, 255)


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def display_size(orig_size: Sequence[int], longest: int = PANEL_LONGEST) -> tuple[int, int]:
    """(H, W) with the original image's aspect ratio and the longer side ``longest``."""
    height, width = int(orig_size[0]), int(orig_size[1])
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_array(array: np.ndarray, size: tuple[int, int], kind: str) -> np.ndarray:
    """Resize an image (``image``: bicubic), a float map (``map``: bilinear) or a mask (``mask``: nearest).

    Args:
        array: (h, w, 3) uint8, (h, w) float or (h, w) {0, 1}.
        size: target (H, W).
        kind: ``image`` | ``map`` | ``mask``.

    Returns:
        The array at (H, W): uint8 image, float32 map or bool mask.
    """
    target = (size[1], size[0])  # PIL wants (W, H)
    if kind == "image":
        return np.asarray(Image.fromarray(np.asarray(array, np.uint8)).resize(target, Image.Resampling.BICUBIC))
    if kind == "map":
        values = Image.fromarray(np.asarray(array, np.float32), mode="F")
        return np.asarray(values.resize(target, Image.Resampling.BILINEAR), dtype=np.float32)
    mask = Image.fromarray((np.asarray(array) != 0).astype(np.uint8) * 255)
    return np.asarray(mask.resize(target, Image.Resampling.NEAREST)) > 127


def colour_scale(values: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> tuple[float, float]:
    """The display range of a category: percentiles of its map values (a constant map gets a tiny range).

    Args:
        values: (N,) map values sampled over all the category's images.
        low_pct: percentile mapped to the bottom of the colour bar.
        high_pct: percentile mapped to the top.

    Returns:
        (vmin, vmax) with vmax > vmin.
    """
    low, high = (float(v) for v in np.percentile(np.asarray(values, np.float64), [low_pct, high_pct]))
    return (low, high) if high > low else (low, low + 1e-6)


def _tint(image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Blend ``colour`` into the region and draw its outline fully, so small regions stay visible."""
    out = image.copy()
    out[region] = (0.5 * out[region].astype(np.float32) + 0.5 * np.array(colour, np.float32)).round().astype(np.uint8)
    out[_mask_outline(region)] = colour
    return out


def colour_bar(height: int, width: int = 16) -> np.ndarray:
    """A vertical jet bar, the top of the scale at the top: (height, width, 3) uint8 (numbers: `render_panel`)."""
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    return colorize(ramp)


def _tiles(
    image: np.ndarray, scores: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None, scale: tuple[float, float]
) -> list[np.ndarray]:
    heat = colorize(normalize_map(scores, *scale))
    blend = (0.5 * heat.astype(np.float32) + 0.5 * image.astype(np.float32)).round().astype(np.uint8)
    if gt is not None and gt.any():
        blend[_mask_outline(gt)] = _GT_COLOUR  # where the defect really is, on the heatmap too
    truth = _tint(image, gt, _GT_COLOUR) if gt is not None else image
    predicted = _tint(image, pred, _PRED_COLOUR) if pred is not None else image
    return [image, blend, truth, predicted]


def render_panel(
    image_u8: np.ndarray,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray | None,
    scale: tuple[float, float],
    header: Sequence[str],
    scale_note: str,
    pixel_threshold: float | None = None,
) -> np.ndarray:
    """A labelled panel: header lines, then image | heatmap (+ GT outline) | ground truth | prediction, colour bar.

    All inputs are at the display size (see `display_size`, `resize_array`); the colour scale is the category's.

    Args:
        image_u8: (H, W, 3) uint8.
        anomaly_map: (H, W) raw map values (not normalised).
        gt_mask: (H, W) bool, or None when the image has no mask (an anomaly without one).
        scale: (vmin, vmax) of the colour bar.
        header: text lines written above the tiles (score, label, defect type, decision).
        scale_note: how the colour scale was chosen (written as the last header line).
        pixel_threshold: predicted mask = map > threshold; None: no prediction tile content.

    Returns:
        (header + caption + H, 4 W + bar, 3) uint8.
    """
    height, width = image_u8.shape[:2]
    if anomaly_map.shape != (height, width):
        raise ValueError(f"map {anomaly_map.shape} and image {image_u8.shape[:2]} must have the same size")
    pred = anomaly_map > pixel_threshold if pixel_threshold is not None else None
    tiles = _tiles(np.asarray(image_u8, np.uint8), anomaly_map, gt_mask, pred, scale)
    header = [*header, f"colour scale: {scale_note}"]
    font, line = _font(13), 17
    top = line * len(header) + 8
    bar_w, gap = PANEL_BAR, PANEL_GAP
    canvas = Image.new("RGB", (4 * width + 3 * gap + bar_w, top + line + height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(header):
        draw.text((4, 4 + i * line), text, fill=_TEXT, font=font)
    gt_caption = "ground truth (red)" if gt_mask is not None else "ground truth: no mask"
    pred_caption = f"prediction > {pixel_threshold:.3g} (cyan)" if pred is not None else "prediction: no threshold"
    for i, (tile, caption) in enumerate(zip(tiles, ("image", "heatmap", gt_caption, pred_caption), strict=True)):
        x = i * (width + gap)
        canvas.paste(Image.fromarray(tile), (x, top + line))
        draw.text((x + 2, top + 1), caption, fill=_TEXT, font=_font(11))
    bar_x = 4 * (width + gap)
    canvas.paste(Image.fromarray(colour_bar(height)), (bar_x, top + line))
    small = _font(11)
    draw.text((bar_x + 20, top + line), f"{scale[1]:.3g}", fill=_TEXT, font=small)
    draw.text((bar_x + 20, top + line + height // 2 - 6), f"{(scale[0] + scale[1]) / 2:.3g}", fill=_TEXT, font=small)
    draw.text((bar_x + 20, top + line + height - 13), f"{scale[0]:.3g}", fill=_TEXT, font=small)
    draw.text((bar_x, top + 1), "map value", fill=_TEXT, font=small)
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------------- selection
PANEL_REASONS = {
    "fp": "false positive (highest-scoring normal image)",
    "normal": "highest-scoring normal image (not a false positive)",
    "fn": "false negative (lowest-scoring defective image)",
    "defect": "lowest-scoring defective image (still detected)",
    "top": "highest-scoring image of its defect type",
    # the further panels, in turn: normal images by descending, defective ones by ascending score
    "fp_more": "false positive (a further normal image, by descending score)",
    "normal_more": "a further normal image by descending score (not a false positive)",
    "fn_more": "false negative (a further defective image, by ascending score)",
    "defect_more": "a further defective image by ascending score (still detected)",
    "all": "every image saved",
}


def keep_set(scores: Sequence[float], labels: Sequence[int], defect_types: Sequence[str], n: int) -> set[int]:
    """Indices whose maps may still be selected by `select_panels` (a superset, bounded by about 3 n + types).

    Ranks only get worse as images are added, so an index dropped once can never be selected later.
    """
    if n <= 0:
        return set()
    normal = sorted((i for i, y in enumerate(labels) if y == 0), key=lambda i: (-scores[i], i))
    defective = sorted((i for i, y in enumerate(labels) if y != 0), key=lambda i: (scores[i], i))
    best: dict[str, int] = {}
    for i in sorted(defective, key=lambda i: (-scores[i], i)):
        best.setdefault(defect_types[i], i)
    return {*normal[:n], *defective[:n], *best.values()}


def select_panels(
    scores: Sequence[float],
    labels: Sequence[int],
    defect_types: Sequence[str],
    n: int | None,
    threshold: float | None = None,
) -> list[tuple[int, str]]:
    """Which images of a category get a panel, and why.

    Order: the highest-scoring normal image (a false positive at ``threshold``, else the worst-looking normal), the
    lowest-scoring defective image (false negative / weakest detection), the highest-scoring image of each defect
    type, then further normal (descending) and defective (ascending) images in turn, up to ``n``.

    Args:
        scores: (N,) image scores.
        labels: (N,) 0 normal, 1 anomalous.
        defect_types: (N,) defect type per image ("good" for normal ones).
        n: panels wanted; None = every image (loader order, reason "all").
        threshold: image threshold for the FP / FN wording; None = no decision.

    Returns:
        [(index, reason)], reasons as in ``PANEL_REASONS``.
    """
    if n is None:
        return [(i, "all") for i in range(len(scores))]
    normal = sorted((i for i, y in enumerate(labels) if y == 0), key=lambda i: (-scores[i], i))
    defective = sorted((i for i, y in enumerate(labels) if y != 0), key=lambda i: (scores[i], i))

    def normal_reason(i: int) -> str:
        reason = "fp" if threshold is not None and scores[i] > threshold else "normal"
        return reason if i == normal[0] else f"{reason}_more"  # only the first is "the highest-scoring"

    def defect_reason(i: int) -> str:
        reason = "fn" if threshold is not None and scores[i] <= threshold else "defect"
        return reason if i == defective[0] else f"{reason}_more"

    picks: list[tuple[int, str]] = [(i, normal_reason(i)) for i in normal[:1]] + [
        (i, defect_reason(i)) for i in defective[:1]
    ]
    best: dict[str, int] = {}
    for i in sorted(defective, key=lambda i: (-scores[i], i)):
        best.setdefault(defect_types[i], i)
    picks += [(best[d], "top") for d in sorted(best)]
    rest = [(i, normal_reason(i)) for i in normal[1:]], [(i, defect_reason(i)) for i in defective[1:]]
    picks += [p for pair in zip(*rest, strict=False) for p in pair]
    longer = max(rest, key=len)
    picks += longer[min(len(rest[0]), len(rest[1])) :]
    chosen: list[tuple[int, str]] = []
    for index, reason in picks:
        if index not in {c for c, _ in chosen}:
            chosen.append((index, reason))
    return chosen[:n]
