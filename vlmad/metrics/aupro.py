"""Area under the per-region-overlap curve (AUPRO): MVTec's official definition and the legacy variant.

See docs/spec data-and-metrics.md §5. Both functions accept one (N, H, W) array or a sequence of (H, W) /
(B, H, W) arrays, so maps of different sizes (e.g. non-square VisA at original resolution) can be pooled.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from torch import Tensor

ArrayLike = Tensor | np.ndarray
MapsLike = ArrayLike | Sequence[ArrayLike]

# 8-connectivity inside each image, no connection across the stacked image axis.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True
_STRUCTURE_4 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_4[1] = ndimage.generate_binary_structure(2, 1)


def _to_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _as_stacks(maps: MapsLike) -> list[np.ndarray]:
    """Turn the accepted inputs into a list of (B, H, W) numpy arrays."""
    items = [maps] if isinstance(maps, Tensor | np.ndarray) else list(maps)
    stacks = []
    for item in items:
        array = _to_numpy(item)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise ValueError(f"expected (H, W) or (N, H, W) arrays, got shape {array.shape}")
        stacks.append(array)
    return stacks


def label_regions(
    anomaly_maps: MapsLike, masks: MapsLike, connectivity: int = 8
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pool scores and label ground-truth regions per image.

    Args:
        anomaly_maps: (N, H, W) scores, or a sequence of (H, W) / (B, H, W) arrays.
        masks: same layout as `anomaly_maps`, {0, 1}.
        connectivity: 8 (MVTec, 3x3 ones) or 4 (only for diagnostics).

    Returns:
        scores: (P,) all pixels of all images, in their own dtype.
        region_ids: (P,) int64, 0 for defect-free pixels, 1..R for the regions (unique across images).
        num_regions: R.
    """
    map_stacks, mask_stacks = _as_stacks(anomaly_maps), _as_stacks(masks)
    if len(map_stacks) != len(mask_stacks):
        raise ValueError("anomaly_maps and masks must have the same layout")
    structure = {8: _STRUCTURE_8, 4: _STRUCTURE_4}[connectivity]
    scores, region_ids, offset = [], [], 0
    for map_stack, mask_stack in zip(map_stacks, mask_stacks, strict=True):
        if map_stack.shape != mask_stack.shape:
            raise ValueError(f"map shape {map_stack.shape} != mask shape {mask_stack.shape}")
        labels, count = ndimage.label(mask_stack != 0, structure=structure)  # (B, H, W)
        labels = labels.astype(np.int64).ravel()
        labels[labels > 0] += offset
        offset += count
        scores.append(map_stack.ravel())
        region_ids.append(labels)
    return np.concatenate(scores), np.concatenate(region_ids), offset


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of y(x) on [x[0], x_max], with y linearly interpolated at x_max (MVTec's routine)."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def pro_curve(scores: np.ndarray, region_ids: np.ndarray, num_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve over every distinct score, float64.

    Args:
        scores: (P,) pooled pixel scores.
        region_ids: (P,) 0 for defect-free pixels, 1..R for region pixels.
        num_regions: R (> 0).

    Returns:
        fpr, pro: (K + 2,) increasing curve from (0, 0) to (1, 1), one point per distinct score.
    """
    areas = np.bincount(region_ids, minlength=num_regions + 1).astype(np.float64)
    num_normal = areas[0]
    # Each region pixel adds 1 / (R * area) to PRO; normal pixels add nothing (weight 0).
    pro_weights = np.zeros(num_regions + 1, dtype=np.float64)
    pro_weights[1:] = 1.0 / (num_regions * areas[1:])

    order = np.argsort(scores)[::-1]  # descending; the order inside a tie is irrelevant (only run ends kept)
    sorted_scores = scores[order]
    sorted_ids = region_ids[order]
    del order
    # Last point of each run of equal scores = threshold t with "score >= t" positive.
    run_end = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    del sorted_scores
    fpr = np.cumsum(sorted_ids == 0, dtype=np.int64)[run_end] / num_normal
    pro = np.cumsum(pro_weights[sorted_ids])[run_end]
    # Same guard as MVTec's code against cumulative rounding above 1.
    np.clip(fpr, None, 1.0, out=fpr)
    np.clip(pro, None, 1.0, out=pro)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def aupro(anomaly_maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3, connectivity: int = 8) -> float:
    """AUPRO as in MVTec AD's official evaluation (IJCV 2021), normalised to [0, 1].

    Regions are 8-connected components of each mask; FPR counts every defect-free pixel of every image
    (normal images included); every distinct score is a threshold; area up to `fpr_limit` / `fpr_limit`.

    Args:
        anomaly_maps: (N, H, W) scores (or a sequence of (H, W) / (B, H, W) arrays).
        masks: same layout, {0, 1}.
        fpr_limit: upper integration limit in (0, 1].
        connectivity: 8 (official); 4 only to show that connectivity matters.

    Returns:
        AUPRO in [0, 1]; NaN (with a warning) without regions or without defect-free pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, region_ids, num_regions = label_regions(anomaly_maps, masks, connectivity)
    if num_regions == 0 or not (region_ids == 0).any():
        warnings.warn("AUPRO undefined: no ground-truth regions or no defect-free pixels", stacklevel=2)
        return float("nan")
    fpr, pro = pro_curve(scores, region_ids, num_regions)
    return _trapezoid(fpr, pro, fpr_limit) / fpr_limit


def _sklearn_auc(x: np.ndarray, y: np.ndarray) -> float:
    """`sklearn.metrics.auc`: trapezoid with the direction of a monotonic x."""
    dx = np.diff(x)
    if np.all(dx <= 0):
        direction = -1.0
    elif np.all(dx >= 0):
        direction = 1.0
    else:
        raise ValueError("x is neither increasing nor decreasing")
    return float(direction * (dx * (y[1:] + y[:-1]) / 2.0).sum())


def aupro_legacy(anomaly_maps: MapsLike, masks: MapsLike, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """AUPRO as AnomalyCLIP / APRIL-GAN `cal_pro_score` (from cflow-ad) compute it; for paper tables only.

    Quirks reproduced: 200 float32 thresholds `arange(min, max, (max - min) / 200)`, positive = score > t,
    keep FPR < 0.3, min-max rescale of the kept FPRs, no point at 0.3. Regions are labelled once and the
    per-threshold counts come from one histogram instead of re-labelling at every threshold.

    Args:
        anomaly_maps: (N, H, W) scores (or a sequence of (H, W) / (B, H, W) arrays); cast to float32.
        masks: same layout, {0, 1}.
        max_step: number of threshold steps.
        expect_fpr: FPR cut-off.

    Returns:
        Legacy AUPRO; NaN (with a warning) when undefined.
    """
    scores, region_ids, num_regions = label_regions(anomaly_maps, masks, 8)
    scores = scores.astype(np.float32, copy=False)
    num_normal = int((region_ids == 0).sum())
    min_th, max_th = scores.min(), scores.max()
    if num_regions == 0 or num_normal == 0 or max_th == min_th:
        warnings.warn("legacy AUPRO undefined: no regions, no defect-free pixels or constant maps", stacklevel=2)
        return float("nan")
    thresholds = np.arange(min_th, max_th, (max_th - min_th) / max_step)  # float32, as the reference
    num_th = len(thresholds)
    # rank = number of thresholds strictly below the score: the pixel is positive (score > t_j) iff j < rank.
    rank = np.searchsorted(thresholds, scores, side="left")
    hist = np.bincount(region_ids * (num_th + 1) + rank, minlength=(num_regions + 1) * (num_th + 1))
    hist = hist.reshape(num_regions + 1, num_th + 1)
    # positives[:, j] = pixels with rank > j = suffix sum over ranks j + 1 .. num_th.
    positives = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (R + 1, T)
    areas = hist.sum(axis=1)
    pros = (positives[1:] / areas[1:, None]).mean(axis=0)  # (T,)
    fprs = positives[0] / num_normal  # (T,)
    keep = fprs < expect_fpr
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or fprs.max() == fprs.min():
        warnings.warn("legacy AUPRO undefined: fewer than two distinct FPRs below the cut-off", stacklevel=2)
        return float("nan")
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return _sklearn_auc(fprs, pros)
