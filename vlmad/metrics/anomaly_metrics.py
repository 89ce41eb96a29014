"""Per-category accumulator for the image and pixel anomaly-detection metrics (spec §5, §7)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve

from vlmad.metrics.aupro import aupro_legacy, pixel_metrics
from vlmad.metrics.names import METRIC_NAMES, UndefinedMetricWarning

__all__ = ["METRIC_NAMES", "AnomalyMetrics", "UndefinedMetricWarning", "binary_curve_metrics"]

_NAN = float("nan")


@contextlib.contextmanager
def _float64_counts() -> Iterator[None]:
    """Make torchmetrics' exact curves count TP/FP in float64.

    `_binary_clf_curve` multiplies the targets by a Python float, so the counts take the default dtype;
    in float32, counts above 2**24 would be rounded.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _check_unit_interval(name: str, values: Tensor) -> None:
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or bool((values > 1).any()):
        raise ValueError(
            f"{name} must be finite and in [0, 1] (got min {values.min().item():.4g}, max "
            f"{values.max().item():.4g}): torchmetrics treats a batch with any value outside [0, 1] as "
            "logits and applies a sigmoid, which breaks the ranking across batches "
            "(Lightning-AI/torchmetrics#1526)."
        )


def binary_curve_metrics(scores: Tensor, target: Tensor) -> tuple[float, float, float]:
    """Exact AUROC, step-wise AP (sklearn `average_precision_score`) and oracle F1-max.

    Args:
        scores: (P,) float scores in [0, 1].
        target: (P,) {0, 1} labels, both classes present.

    Returns:
        (auroc, ap, f1max).
    """
    with _float64_counts():
        auroc = binary_auroc(scores, target, thresholds=None, validate_args=False).item()
        precision, recall, _ = binary_precision_recall_curve(scores, target, thresholds=None, validate_args=False)
    # Same sum as torchmetrics' binary_average_precision, without sorting the scores a third time.
    ap = -torch.sum((recall[1:] - recall[:-1]) * precision[:-1]).item()
    f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[torch.isfinite(f1)]
    return auroc, ap, f1.max().item() if f1.numel() else _NAN


class AnomalyMetrics:
    """Accumulates one category's predictions and computes every reported metric.

    Image metrics use torchmetrics' exact curves; pixel metrics use `pixel_metrics` (same definitions,
    one shared sort of the pooled pixels for AUROC, AP, F1-max and AUPRO).

    Call `compute()` then `reset()` per category so that at most one category's pixels are held
    (≈216 MB of float32 maps for 201 images at 518x518).

    Args:
        aupro_mode: "official" (MVTec definition) or "legacy" (AnomalyCLIP / APRIL-GAN) fills `pixel_aupro`.
        compute_pixel: whether to keep maps and report pixel metrics.
        legacy_aupro: also report `pixel_aupro_legacy`.
    """

    def __init__(self, aupro_mode: str = "official", compute_pixel: bool = True, legacy_aupro: bool = False):
        if aupro_mode not in ("official", "legacy"):
            raise ValueError(f"aupro_mode must be 'official' or 'legacy', got {aupro_mode!r}")
        self.aupro_mode = aupro_mode
        self.compute_pixel = compute_pixel
        self.legacy_aupro = legacy_aupro
        self.reset()

    def reset(self) -> None:
        """Drop all accumulated state."""
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._maps: list[Tensor] = []
        self._masks: list[Tensor] = []

    def update(
        self,
        pred_score: Tensor,
        label: Tensor,
        anomaly_map: Tensor | None = None,
        mask: Tensor | None = None,
        has_mask: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            pred_score: (B,) image scores in [0, 1].
            label: (B,) {0, 1}.
            anomaly_map: (B, H, W) pixel scores in [0, 1].
            mask: (B, H, W) {0, 1}.
            has_mask: (B,) bool; images without a mask count for image metrics only.
        """
        pred_score = pred_score.detach().reshape(-1)
        _check_unit_interval("pred_score", pred_score)
        if label.numel() != pred_score.numel():
            raise ValueError(f"pred_score has {pred_score.numel()} entries but label {label.numel()}")
        self._scores.append(pred_score.to("cpu", torch.float32))
        self._labels.append(label.detach().reshape(-1).to("cpu", torch.uint8))
        if not self.compute_pixel or anomaly_map is None or mask is None:
            return
        anomaly_map = anomaly_map.detach()
        _check_unit_interval("anomaly_map", anomaly_map)
        if anomaly_map.shape != mask.shape or anomaly_map.ndim != 3:
            raise ValueError(f"anomaly_map {tuple(anomaly_map.shape)} and mask {tuple(mask.shape)} must be (B, H, W)")
        if has_mask is not None:
            keep = has_mask.detach().reshape(-1).to(anomaly_map.device, torch.bool)
            anomaly_map, mask = anomaly_map[keep], mask[keep.to(mask.device)]
        if anomaly_map.shape[0]:
            self._maps.append(anomaly_map.to("cpu", torch.float32))
            self._masks.append(mask.detach().to("cpu") != 0)

    def compute(self, category: str | None = None) -> dict[str, float]:
        """Metrics of everything accumulated since the last `reset()`.

        Args:
            category: name used in the warnings for undefined metrics.

        Returns:
            Fractions keyed by `METRIC_NAMES` (+ `pixel_aupro_legacy`); NaN with an `UndefinedMetricWarning`
            where undefined (a category with only normal or only defective images).
        """
        where = f" for category {category!r}" if category is not None else ""
        results = dict.fromkeys(METRIC_NAMES, _NAN)
        if self.legacy_aupro:
            results["pixel_aupro_legacy"] = _NAN
        if self._scores:
            scores, labels = torch.cat(self._scores), torch.cat(self._labels)
            if labels.min() == labels.max():
                kind = "defective" if int(labels[0]) else "normal"
                warnings.warn(
                    f"image metrics undefined{where}: all {labels.numel()} images are {kind}; "
                    "the category is left out of the image-metric mean",
                    UndefinedMetricWarning,
                    stacklevel=2,
                )
            else:
                auroc, ap, f1 = binary_curve_metrics(scores, labels)
                results.update(image_auroc=auroc, image_ap=ap, image_f1max=f1)
        if self.compute_pixel:
            results.update(self._compute_pixel(where))
        return results

    def _compute_pixel(self, where: str) -> dict[str, float]:
        if not self._maps:
            warnings.warn(f"pixel metrics undefined{where}: no images with masks", UndefinedMetricWarning, stacklevel=3)
            return {}
        num_anomalous = sum(int(m.sum()) for m in self._masks)
        if num_anomalous == 0 or num_anomalous == sum(m.numel() for m in self._masks):
            kind = "anomalous" if num_anomalous == 0 else "normal"
            warnings.warn(f"pixel metrics undefined{where}: no {kind} pixels", UndefinedMetricWarning, stacklevel=3)
            return {}
        # One shared sort for the pooled pixels (maps may differ in size between batches).
        results = pixel_metrics(self._maps, self._masks)
        if self.aupro_mode == "legacy" or self.legacy_aupro:
            legacy = aupro_legacy(self._maps, self._masks)
            if self.legacy_aupro:
                results["pixel_aupro_legacy"] = legacy
        if self.aupro_mode == "legacy":
            results["pixel_aupro"] = legacy
        return results
