"""Per-image results of an evaluation: ``predictions.csv`` rows, per-category thresholds and heatmap panels.

The module collects scalars for every test image and the maps of the few images a panel may show (see
`vlmad.outputs.heatmaps.keep_set`); panels are drawn when the category ends, on the category's own colour scale.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmad.data.records import DataError, Reader, Record
from vlmad.errors import VlmadError
from vlmad.io import atomic_write
from vlmad.outputs.heatmaps import (
    PANEL_REASONS,
    colour_scale,
    denormalize_image,
    display_size,
    keep_set,
    render_panel,
    resize_array,
    save_png,
    select_panels,
)

if TYPE_CHECKING:  # torch-free at import: vlmad predict with an exported model uses the columns and writers
    from torch import Tensor

    from vlmad.methods.base import AnomalyMethod


class ThresholdError(VlmadError, ValueError):
    """A threshold that cannot be computed or read (bad quantile, no normal images, unreadable file)."""


def calibrate_threshold(
    method: AnomalyMethod, images: Tensor | Iterable[Tensor], quantile: float, class_name: str = "object"
) -> dict[str, Any]:
    """Thresholds = the ``quantile`` of the image scores / pixel scores of NORMAL images.

    The quantile is taken with ``higher`` interpolation, so a threshold is an observed normal score and at
    most a fraction 1 - q (+ 1/n rounding) of the normal images score above it.

    Args:
        method: a method already ``prepare``-d for ``class_name``.
        images: (N, 3, S, S) preprocessed normal images, or an iterable of (B, 3, S, S) batches.
        quantile: in (0, 1].
        class_name: object name passed to the method.

    Returns:
        image_threshold, pixel_threshold, quantile, n_normal_images.
    """
    if not 0.0 < quantile <= 1.0:
        raise ThresholdError(f"threshold.calibration.quantile must be in (0, 1], got {quantile}")
    import torch

    batches = [images] if isinstance(images, torch.Tensor) else images
    scores, maps = [], []
    with torch.inference_mode():
        for batch in batches:
            pred = method(batch.to(next(method.parameters()).device), [class_name] * batch.shape[0])
            scores.append(pred.pred_score.float().cpu().numpy())
            maps.append(pred.anomaly_map.float().cpu().numpy().ravel())
    if not scores:
        raise ThresholdError("no normal images to calibrate on")
    all_scores = np.concatenate(scores)
    return {
        "image_threshold": float(np.quantile(all_scores, quantile, method="higher")),
        "pixel_threshold": float(np.quantile(np.concatenate(maps), quantile, method="higher")),
        "quantile": float(quantile),
        "n_normal_images": len(all_scores),
    }


def absolute_path(path: str) -> str:
    """The absolute form of an image path as ``predictions.csv`` writes it (a mosaic's ``a|b|c`` part by part)."""
    return "|".join(os.path.abspath(part) for part in path.split("|"))


# ``path`` is absolute (data roots and inputs given relative are resolved against the working directory).
PREDICTION_COLUMNS = (
    "path",
    "category",
    "label",
    "defect_type",
    "has_mask",
    "image_score",
    "max_pixel_score",
    "image_threshold",
    "pixel_threshold",
    "decision",
    "threshold_source",
)
MAP_SAMPLE = 4096  # map values kept per image for the category's colour scale (percentiles of a subsample)
SCALE_PERCENTILES = (1.0, 99.0)


def no_threshold(reason: str) -> dict[str, Any]:
    """The threshold record of a category without a calibrated threshold, saying why."""
    return {"image_threshold": None, "pixel_threshold": None, "source": reason}


def normal_training_records(
    reader: Reader, category: str, exclude: Iterable[str], max_images: int | None
) -> list[Record]:
    """The category's normal training images (``train/good``) minus the few-shot references, first ``max_images``.

    References are left out as in ``vlmad.deploy.predict``: they score ~0 against themselves and would pull the
    threshold down. Never test images: thresholds must not see the test labels.
    """
    try:
        records = reader.records(category, "train")
    except DataError:  # e.g. a folder dataset without train/: no calibration, said in the threshold source
        return []
    skip = {str(Path(p).resolve()) for p in exclude}
    normal = [r for r in records if r.label == 0 and str(Path(r.image).resolve()) not in skip]
    return normal if max_images is None else normal[: int(max_images)]


def _atomic_write(path: Path, write: Any) -> None:
    """``vlmad.io.atomic_write`` of text: mode 0644 under the usual umask like every other output (mkstemp: 0600)."""

    def write_text(raw: Any) -> None:
        handle = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        write(handle)
        handle.flush()
        handle.detach()  # the binary file is closed by atomic_write

    atomic_write(path, write_text)


def write_predictions(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically write ``predictions.csv`` (columns ``PREDICTION_COLUMNS``; missing thresholds empty)."""

    def write(handle: Any) -> None:
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row.get(k) for k in PREDICTION_COLUMNS} for row in rows)

    _atomic_write(Path(path), write)


def write_thresholds(path: str | os.PathLike, thresholds: dict[str, dict[str, Any]]) -> None:
    """Atomically write ``thresholds.json``: {category: image/pixel threshold, quantile, images used, source}."""
    _atomic_write(Path(path), lambda handle: handle.write(json.dumps(thresholds, indent=2) + "\n"))


def decision(score: float, threshold: float | None) -> str:
    """``NG`` (anomalous) when the score exceeds the threshold, ``OK`` otherwise, ``n/a`` without one."""
    if threshold is None:
        return "n/a"
    return "NG" if score > threshold else "OK"


class CategoryOutputs:
    """One category's per-image rows, colour-scale sample and candidate maps for panels.

    Args:
        category: dataset category name.
        num_panels: panels to save for the category; None = every image (``module.save_all_overlays``).
    """

    def __init__(self, category: str, num_panels: int | None) -> None:
        self.category = category
        self.num_panels = num_panels
        self.rows: list[dict[str, Any]] = []
        self.maps: dict[int, np.ndarray] = {}  # index in loader order -> (S, S) float16 map
        self._samples: list[np.ndarray] = []

    def add(self, batch: dict, scores: Tensor, maps: Tensor) -> None:
        """Record a batch in loader order.

        Args:
            batch: the test batch (``path``, ``label``, ``defect_type``, ``has_mask``).
            scores: (B,) image scores.
            maps: (B, S, S) anomaly maps.
        """
        scores_np = scores.detach().float().cpu().numpy()
        maps_np = maps.detach().float().cpu().numpy()
        step = max(1, maps_np[0].size // MAP_SAMPLE) if len(maps_np) else 1
        self._samples.append(maps_np.reshape(len(maps_np), -1)[:, ::step].ravel())
        for i in range(len(scores_np)):
            index = len(self.rows)
            self.rows.append(
                {
                    "path": absolute_path(str(batch["path"][i])),
                    "category": self.category,
                    "label": int(batch["label"][i]),
                    "defect_type": str(batch["defect_type"][i]),
                    "has_mask": bool(batch["has_mask"][i]),
                    "image_score": float(scores_np[i]) + 0.0,  # + 0.0: never -0.0 in the file
                    "max_pixel_score": float(maps_np[i].max()) + 0.0,
                }
            )
            self.maps[index] = maps_np[i].astype(np.float16)  # display only: half the memory
        if self.num_panels is not None:
            keep = keep_set(*self._columns(), self.num_panels)
            self.maps = {i: m for i, m in self.maps.items() if i in keep}

    def _columns(self) -> tuple[list[float], list[int], list[str]]:
        return (
            [r["image_score"] for r in self.rows],
            [r["label"] for r in self.rows],
            [r["defect_type"] for r in self.rows],
        )

    def finish(self, threshold: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows with the category's thresholds, their source and the OK / NG decision."""
        t_image, t_pixel = threshold.get("image_threshold"), threshold.get("pixel_threshold")
        for row in self.rows:
            row.update(
                image_threshold=t_image,
                pixel_threshold=t_pixel,
                threshold_source=threshold["source"],
                decision=decision(row["image_score"], t_image),
            )
        return self.rows

    def scale(self) -> tuple[float, float]:
        """The category's colour scale: (1st, 99th) percentile of its sampled map values."""
        return colour_scale(np.concatenate(self._samples), *SCALE_PERCENTILES) if self._samples else (0.0, 1.0)

    def save_panels(
        self, dataset: Any, folder: Path, mean: Sequence[float], std: Sequence[float], threshold: dict[str, Any]
    ) -> list[Path]:
        """Draw and save the chosen panels (`heatmaps.select_panels`) as ``NN_<reason>_<defect>_<stem>.png``.

        Args:
            dataset: the category's test dataset (same order as the loader): images are read back for the panels.
            folder: ``heatmaps/<category>``.
            mean: normalisation mean of the transform.
            std: normalisation std.
            threshold: the category's thresholds (``finish`` has been called).

        Returns:
            The written files.
        """
        picks = select_panels(*self._columns(), self.num_panels, threshold.get("image_threshold"))
        vmin, vmax = self.scale()
        note = f"{vmin:.3g}..{vmax:.3g} = p{SCALE_PERCENTILES[0]:g}-p{SCALE_PERCENTILES[1]:g} of {self.category}'s maps"
        written = []
        for k, (index, reason) in enumerate(picks):
            row, sample = self.rows[index], dataset[index]
            orig = sample.get("orig_size")  # native aspect ratio: the squashed model input is stretched back
            size = display_size([int(v) for v in orig] if orig is not None else sample["image"].shape[-2:])
            image = resize_array(denormalize_image(sample["image"], mean, std), size, "image")
            amap = resize_array(self.maps[index].astype(np.float32), size, "map")
            gt = resize_array(sample["mask"].numpy(), size, "mask") if row["has_mask"] else None
            panel = render_panel(
                image, amap, gt, (vmin, vmax), self._header(row, reason), note, threshold.get("pixel_threshold")
            )
            path = folder / f"{k:02d}_{reason}_{row['defect_type']}_{Path(row['path']).stem}.png"
            save_png(path, panel)
            written.append(path)
        return written

    def _header(self, row: dict[str, Any], reason: str) -> list[str]:
        kind = "ANOMALOUS" if row["label"] else "normal"
        t = row["image_threshold"]
        verdict = f"{row['decision']} at image threshold {t:.4g}" if t is not None else "no decision"
        name = Path(row["path"]).name
        return [
            f"{self.category} / {row['defect_type']}  label: {kind}  ({name}): {PANEL_REASONS[reason]}",
            f"image score {row['image_score']:.4f}  max pixel {row['max_pixel_score']:.4f}  {verdict}",
            f"threshold: {row['threshold_source']}",
        ]
