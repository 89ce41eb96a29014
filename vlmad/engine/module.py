"""The one Lightning-aware model file: wraps any AnomalyMethod with the loop, metrics and checkpointing."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmad.backbones.cache import FeatureCache, choose_storage
from vlmad.data.datamodule import PADDING_KEY
from vlmad.engine.checkpoint import check_checkpoint_fits, checkpoint_entry
from vlmad.methods.base import AnomalyMethod, Prediction
from vlmad.metrics import AnomalyMetrics
from vlmad.metrics.table import write_csv
from vlmad.outputs.predictions import (
    CategoryOutputs,
    no_threshold,
    normal_training_records,
    write_predictions,
    write_thresholds,
)

log = logging.getLogger(__name__)


class AnomalyModule(L.LightningModule):
    """Generic LightningModule: training via ``method.loss``, per-category testing via ``method.forward``.

    Test dataloaders come one per category (``datamodule.test_categories`` order). Metrics are computed and
    reset at each category change, so pixel state never holds more than one category.

    Args:
        method: the algorithm (holds the frozen backbone).
        optimizer: partial optimizer (params supplied here); None for training-free methods.
        scheduler: optional partial LR scheduler.
        metrics: ``aupro_mode`` (official | legacy), ``legacy_aupro`` (also report the legacy AUPRO),
            ``pixel_size`` (``native`` or an int N: maps resized bilinearly, masks by nearest, to N x N).
        reference_seed: seed of the few-shot reference draw (k_shot > 0).
        output_dir: where heatmap panels (``heatmaps/<category>/``), ``predictions.csv``, ``thresholds.json`` and
            reference lists are written.
        num_overlays: panels saved per category (0 disables): the worst false positive and negative, the top image
            of each defect type, then more FP / FN (``vlmad.outputs.heatmaps.select_panels``).
        save_all_overlays: a panel for every test image instead.
        threshold: ``calibrate`` (score the category's normal training images, references excluded, for an OK / NG
            decision per image), ``quantile`` (as predict), ``max_images`` (first N of train/good; None: all),
            ``max_share`` (at most this share of the category's test images, at least one; None: no share cap).
        feature_cache: frozen image-side features reused across epochs and runs: ``auto`` (training only: the fit
            set's features in memory or in the run folder when they fit, see :meth:`_choose_cache`), None,
            ``memory`` or a directory (a disk cache shared by the jobs of a sweep).
        feature_cache_dtype: storage precision of cached features: ``bf16``, ``fp16``, ``fp32`` (exact) or ``auto``
            (bf16 for the ``auto`` fit cache, fp32 for an explicit one: evaluation sweeps report uncached numbers).
    """

    def __init__(
        self,
        method: AnomalyMethod,
        optimizer: Any = None,
        scheduler: Any = None,
        metrics: dict | None = None,
        reference_seed: int = 0,
        output_dir: str | None = None,
        num_overlays: int = 4,
        feature_cache: Any = None,
        save_all_overlays: bool = False,
        threshold: dict | None = None,
        feature_cache_dtype: str = "auto",
    ) -> None:
        super().__init__()
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        metrics = dict(metrics or {})
        self.pixel_size = metrics.pop("pixel_size", "native")
        self.metrics = AnomalyMetrics(**metrics)
        self.reference_seed = reference_seed
        self.output_dir = Path(output_dir) if output_dir else None
        self.num_overlays = num_overlays
        self.save_all_overlays = save_all_overlays
        self.threshold = {"calibrate": True, "quantile": 0.99, "max_images": 32, "max_share": 0.04, **(threshold or {})}
        self.predictions: dict[str, list[dict]] = {}  # category -> per-image rows (scalars only)
        self.thresholds: dict[str, dict] = {}
        self._outputs: CategoryOutputs | None = None
        if feature_cache_dtype == "auto":
            feature_cache_dtype = "bf16" if feature_cache == "auto" else "fp32"
        self.feature_cache_dtype = feature_cache_dtype
        self._auto_cache = feature_cache == "auto"  # chosen in on_fit_start, released in on_fit_end
        self._auto_dir: Path | None = None
        self.fit_cache_stats: dict[str, Any] | None = None  # auto: the fit cache's figures, kept after it is dropped
        if self._auto_cache:
            feature_cache = None
        elif feature_cache is not None and not method.cacheable:
            name = type(method).__name__
            log.info("module.feature_cache ignored: %s does not declare cacheable = True (frozen features)", name)
            feature_cache = None
        self.feature_cache = FeatureCache.from_setting(feature_cache, feature_cache_dtype)
        method.attach_cache(self.feature_cache)  # the method encodes images through it (train and test)
        self.strict_loading = False  # the frozen backbone is never in a checkpoint
        self.results: dict[str, dict[str, float]] = {}
        self._category: str | None = None
        self._opened_at = 0.0  # when the open category started (its log line says how long it took)
        self._epoch_losses: dict[str, float] = {}  # image-weighted sums of this epoch's losses, and "n" images
        self._epoch_started = 0.0
        self._pending: list[dict] = []  # transductive methods: the open category's labels/masks until it is scored

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> Any:
        """Adam etc. over the method's parameter groups (``method.param_groups``; None for training-free methods)."""
        groups = [g for g in self.method.param_groups() if g["params"]]
        if self.optimizer_factory is None or not groups:
            return None
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """One step of ``method.loss`` (on cached image features when a cache is attached)."""
        self._prime_cache(batch)
        if self.feature_cache is not None and "augmented" in batch:  # per-epoch mosaics: encoded, never cached
            self.feature_cache.bypass_next(torch.as_tensor(batch["augmented"]).tolist())
        losses = self.method.loss(batch)
        bs = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=bs, on_epoch=True)
            self._epoch_losses[name] = self._epoch_losses.get(name, 0.0) + float(value.detach()) * bs
        self._epoch_losses["n"] = self._epoch_losses.get("n", 0.0) + bs
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """The method's own gradient handling (e.g. VisualAD's per-token clipping), on unscaled gradients."""
        self.method.before_optimizer_step()

    def on_fit_start(self) -> None:
        """``feature_cache: auto``: choose where the fit set's frozen features live (:meth:`_choose_cache`)."""
        if self._auto_cache:
            self._choose_cache()

    def on_fit_end(self) -> None:
        """``auto``: drop the fit cache (test images are encoded once) and its run-folder files."""
        if not self._auto_cache or self.feature_cache is None:
            return
        cache = self.feature_cache  # its report: the last epoch's line (on_train_epoch_end)
        self.fit_cache_stats = {
            "storage": cache.storage,
            "dtype": cache.dtype,
            "hits": cache.hits,
            "misses": cache.misses,
            "bypassed": cache.bypassed,
            "bytes": cache.bytes,
        }
        self.method.attach_cache(None)
        self.feature_cache = None
        self._datamodule.feature_reader = None
        if self._auto_dir is not None:
            if self.method.text_cache.directory == self._auto_dir / "text":
                self.method.text_cache.directory = None
            self.trainer.strategy.barrier()  # every rank is done with the files
            if self.global_rank == 0:
                shutil.rmtree(self._auto_dir, ignore_errors=True)
            self._auto_dir = None

    def _choose_cache(self) -> None:
        """Memory when the fit set's estimated cached size fits a share of the available host memory, else the run
        folder's disk when it fits a share of its free space, else none (``vlmad.backbones.cache.choose_storage``);
        only for trained methods whose learned parts sit on frozen image features (``method.cacheable``). Per-epoch
        augmented samples (mosaics) bypass the cache. One log line says the choice and the size."""
        method = self.method
        if not (method.trainable and method.cacheable):
            kind = "nothing to train" if not method.trainable else "no declared frozen image features (cacheable)"
            log.info("feature cache: off (auto: %s has %s)", type(method).__name__, kind)
            return
        dm = self._datamodule
        dataset = dm.fit_dataset()
        if len(dataset) == 0 or not any(len(d) for d in dataset.datasets):
            return
        first = next(d for d in dataset.datasets if len(d))[0]  # an original image, never a mosaic
        probe = FeatureCache("memory", dtype=self.feature_cache_dtype)  # one image's entry measures the size
        probe.fetch(method, first["image"][None].to(self.device))
        per_image, n = probe.bytes, len(dataset)
        directory = self.output_dir / "feature_cache" if self.output_dir is not None else None
        storage, reason = choose_storage(per_image * n, directory)
        log.info(
            "feature cache: %s; %d fit images x %.2f MiB (%s) (module.feature_cache=auto)",
            reason,
            n,
            per_image / 2**20,
            self.feature_cache_dtype,
        )
        if storage is None:
            return
        if storage == "disk":
            cache = FeatureCache("disk", str(directory), dtype=self.feature_cache_dtype)
            cache.absorb(probe)
            self._auto_dir = directory
            if str(self.trainer.precision) in ("32", "32-true"):  # as vlmad.engine.run.build for explicit caches
                dm.feature_reader = cache.worker_reader(method)
        else:
            cache = probe
        self.feature_cache = cache
        method.attach_cache(cache)

    def on_train_epoch_start(self) -> None:
        """Start this epoch's loss sums and clock."""
        self._epoch_losses, self._epoch_started = {}, time.perf_counter()

    def on_train_epoch_end(self) -> None:
        """One line per epoch: its mean losses (this rank's images) and seconds; the feature cache's report."""
        n = self._epoch_losses.pop("n", 0.0)
        if n and self.global_rank == 0:
            means = ", ".join(f"{k} {v / n:.4f}" for k, v in self._epoch_losses.items())
            epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else "?"
            seconds = time.perf_counter() - self._epoch_started
            log.info("epoch %d/%s: %s (%d images, %.1f s)", self.current_epoch + 1, epochs, means, n, seconds)
        if self.feature_cache is not None:
            log.info(self.feature_cache.report())

    # ------------------------------------------------------------------ testing
    @property
    def _datamodule(self) -> Any:
        return self.trainer.datamodule

    def on_test_epoch_start(self) -> None:
        """Start with no category open."""
        self.results, self._category, self._pending = {}, None, []
        self.predictions, self.thresholds = {}, {}
        self.metrics.reset()

    def _open_category(self, category: str, class_name: str) -> None:
        if self._category is not None:
            self._close_category()
        self._category, self._opened_at = category, time.perf_counter()
        dm = self._datamodule
        references, paths = None, []
        if self.method.k_shot > 0:
            draw = self.method.reference_draw(class_name)  # the method's rule and views (None: plain random draw)
            references, paths = dm.reference_images(category, self.method.k_shot, self.reference_seed, draw)
            references = references.to(self.device)
            self._write_reference_list(category, paths)
        self.method.prepare(class_name, references)
        self.thresholds[category] = self._calibrate(category, paths)
        self._outputs = CategoryOutputs(category, None if self.save_all_overlays else self.num_overlays)

    def _close_category(self) -> None:
        self._score_transductive()
        self.results[self._category] = self.metrics.compute(self._category)
        self.metrics.reset()
        self.predictions[self._category] = self._outputs.finish(self.thresholds[self._category])
        seconds = time.perf_counter() - self._opened_at
        log.info("%s: %d images in %.1f s", self._category, len(self.predictions[self._category]), seconds)
        if self._partial_csv() is not None:  # finished categories survive a later failure
            write_csv(self._partial_csv(), self.results)
            write_predictions(self._rank_file("predictions.csv"), (r for p in self.predictions.values() for r in p))
            self._save_panels()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score a batch of one category and update that category's metrics."""
        if PADDING_KEY in batch:  # several devices: this rank has fewer categories than the busiest one
            return
        category = batch["category"][0]  # the batch says which category and prompt name: no datamodule lookup
        if len(set(batch["category"])) != 1:
            raise ValueError(f"a test batch holds one category, got {sorted(set(batch['category']))}")
        if category != self._category:
            self._open_category(category, batch["class_name"][0])
        self._prime_cache(batch)
        if self.method.transductive:
            self._accumulate(batch)
            return
        pred: Prediction = self.method(batch["image"], list(batch["class_name"]))
        anomaly_map, mask = self._eval_resolution(pred.anomaly_map, batch["mask"])
        self.metrics.update(pred.pred_score, batch["label"], anomaly_map, mask, batch["has_mask"])
        self._outputs.add(batch, pred.pred_score, pred.anomaly_map)

    def _prime_cache(self, batch: dict) -> None:
        """Hand the disk-cache entries the loader workers read (``cached_features``) to the feature cache."""
        if self.feature_cache is not None and "cache_keys" in batch:
            self.feature_cache.prime(batch["cache_keys"], batch["cached_features"])

    # ------------------------------------------------------------------ transductive (category-level) scoring
    def _accumulate(self, batch: dict) -> None:
        """Hand the batch to the method; keep only what the metrics and outputs need once the category is scored."""
        self.method.accumulate(batch["image"], list(batch["class_name"]))
        # no images: panels read theirs back from the dataset at the category's end
        self._pending.append(
            {
                "label": batch["label"].cpu(),
                "mask": batch["mask"].cpu() != 0,
                "has_mask": batch["has_mask"].cpu(),
                "path": list(batch["path"]),
                "defect_type": list(batch["defect_type"]),
            }
        )

    def _score_transductive(self) -> None:
        """Score the open category's accumulated images as one set, then update metrics and save overlays."""
        pending, self._pending = self._pending, []
        if not self.method.transductive or not pending:
            return
        try:
            pred = self.method.score_accumulated()  # (N,) scores, (N, S, S) maps in accumulation order
        except ValueError as err:  # e.g. a set too small to score: name the dataset's category, not the prompt
            raise ValueError(f"test category {self._category!r}: {err}") from err
        start = 0
        for part in pending:
            stop = start + len(part["label"])
            score, amap = pred.pred_score[start:stop], pred.anomaly_map[start:stop]
            anomaly_map, mask = self._eval_resolution(amap, part["mask"].to(amap.device))
            self.metrics.update(score, part["label"], anomaly_map, mask, part["has_mask"])
            self._outputs.add(part, score, amap)
            start = stop
        if start != pred.pred_score.shape[0]:
            raise RuntimeError(f"{type(self.method).__name__} scored {pred.pred_score.shape[0]} images, got {start}")

    def on_test_epoch_end(self) -> None:
        """Close the last category and log ``test/<category>/<metric>`` plus the means."""
        from vlmad.metrics.table import summarise

        if self._category is not None:
            self._close_category()
        self._category = None
        self.results = summarise(self._gather(self.results))
        self.predictions, self.thresholds = self._gather(self.predictions), self._gather(self.thresholds)
        if self.output_dir is not None and self.global_rank == 0:  # one file of every rank's categories
            write_predictions(self.output_dir / "predictions.csv", (r for p in self.predictions.values() for r in p))
            write_thresholds(self.output_dir / "thresholds.json", self.thresholds)
            for rank in range(1, self.trainer.world_size):
                (self.output_dir / f"predictions.rank{rank}.csv").unlink(missing_ok=True)
            (self.output_dir / "predictions.rank0.csv").unlink(missing_ok=True)
        flat = {f"test/{cat}/{name}": value for cat, row in self.results.items() for name, value in row.items()}
        if flat:  # every rank holds the same gathered results: no reduction needed
            self.log_dict(flat, batch_size=1, rank_zero_only=True)

    def _gather(self, results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Every rank's finished categories, in the datamodule's category order (one device: unchanged).

        Each rank scored whole categories, so the gathered rows equal a single-device run's exactly.
        """
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return results
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, results)
        merged = {cat: row for part in parts for cat, row in part.items()}
        order = self._datamodule.all_categories
        if self._partial_csv() is not None:
            self._partial_csv().unlink(missing_ok=True)  # rank files were the crash copy; metrics.csv follows
        return {cat: merged[cat] for cat in order if cat in merged}

    def _partial_csv(self) -> Path | None:
        """Where finished categories are written as they finish (one file per rank on several devices)."""
        if self.output_dir is None:
            return None
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.output_dir / ("metrics.csv" if world == 1 else f"metrics.rank{self.global_rank}.csv")

    def _eval_resolution(self, anomaly_map: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.pixel_size == "native" or int(self.pixel_size) == anomaly_map.shape[-1]:
            return anomaly_map, mask
        size = (int(self.pixel_size),) * 2
        anomaly_map = F.interpolate(anomaly_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
        return anomaly_map.clamp(0, 1), mask

    def _rank_file(self, name: str) -> Path:
        """``output_dir/name`` on one device, ``<stem>.rank<r><suffix>`` per rank on several."""
        world = self.trainer.world_size if self._trainer is not None else 1
        stem, suffix = Path(name).stem, Path(name).suffix
        return self.output_dir / (name if world == 1 else f"{stem}.rank{self.global_rank}{suffix}")

    def _calibrate(self, category: str, references: list[str]) -> dict[str, Any]:
        """Image / pixel thresholds of a category from its normal TRAINING images only (never the test labels)."""
        from torch.utils.data import DataLoader

        from vlmad.outputs.predictions import calibrate_threshold

        if self.method.transductive:
            return no_threshold(
                "n/a: a transductive method scores the category's test images together, so "
                "training images cannot be scored one by one"
            )
        if not self.threshold["calibrate"]:
            return no_threshold("none (module.threshold.calibrate=false)")
        dm, q = self._datamodule, float(self.threshold["quantile"])
        limit, share, share_note = self.threshold["max_images"], self.threshold.get("max_share"), ""
        if share is not None:  # the calibration stays a small share of the evaluation's own forward passes
            n_test = len(dm.test_set.records(category, "test"))
            by_share = max(1, math.floor(float(share) * n_test + 1e-9))
            if limit is None or by_share < int(limit):
                limit, share_note = by_share, f", max_share {float(share):g} of {n_test} test images"
        records = normal_training_records(dm.test_set, category, references, limit)
        if not records:
            return no_threshold("none (no normal training images)")
        loader = DataLoader(dm._dataset(dm.test_set, records, dm.transform), batch_size=dm.batch_size)
        data = calibrate_threshold(self.method, (b["image"] for b in loader), q, dm.prompt_name(category))
        excluded = " (few-shot references excluded)" if references else ""
        return {
            **data,
            "source": f"q={q:g} of {len(records)} train/good images{excluded}{share_note}",
            "images": [str(r.image) for r in records],
        }

    def _save_panels(self) -> None:
        if self.num_overlays <= 0 and not self.save_all_overlays:
            return
        dm = self._datamodule
        mean, std = dm.transform.mean.flatten().tolist(), dm.transform.std.flatten().tolist()
        folder = self.output_dir / "heatmaps" / self._category
        self._outputs.save_panels(dm.test_dataset(self._category), folder, mean, std, self.thresholds[self._category])

    def _write_reference_list(self, category: str, paths: list[str]) -> None:
        if self.output_dir is None:
            return
        out = self.output_dir / "references" / f"{category}_k{self.method.k_shot}_seed{self.reference_seed}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(paths) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen backbone (GBs for ViT-L) and record what the learned tensors belong to."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".backbone." not in k}
        checkpoint["vlmad"] = checkpoint_entry(self.method)  # settings + the backbone weights the tensors fit

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made for another backbone or prompt/projection shape, with a clear message."""
        check_checkpoint_fits(checkpoint, self.method)
