"""``train(cfg)`` / ``evaluate(cfg)``: explicit wiring of backbone, method, module, data and trainer."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

import vlmad.config  # noqa: F401  (registers the fresh_dir resolver that conf/hydra uses)
from vlmad.loggers import finish_wandb, log_test_report
from vlmad.metrics.table import format_table, write_csv
from vlmad.module import load_method_weights
from vlmad.report import run_info, write_run_json

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename, so a killed run never leaves a torn checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """torch.save to ``path.tmp`` then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def _resolved_without_hydra(cfg: DictConfig) -> dict:
    # configs composed in Python keep the hydra node, whose sweep keys cannot resolve outside a multirun
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}  # fmt: skip


def _loggers(cfg: DictConfig) -> list:
    # W&B runs start lazily (first log_hyperparams in build), in the mode vlmad.loggers.wandb_mode picks
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def _callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def build(cfg: DictConfig, fit: bool) -> dict[str, Any]:
    """Instantiate backbone -> method -> module, the datamodule and the trainer from a composed config."""
    L.seed_everything(cfg.seed, workers=True)
    backbone = instantiate(cfg.backbone)
    method = instantiate(cfg.method, backbone=backbone)
    module = instantiate(cfg.module, method=method)
    if fit:
        datamodule = instantiate(
            cfg.datamodule, test_set=instantiate(cfg.test_data), fit_set=instantiate(cfg.data),
            mean=backbone.mean, std=backbone.std,
        )  # fmt: skip
    else:
        datamodule = instantiate(cfg.datamodule, test_set=instantiate(cfg.data), mean=backbone.mean, std=backbone.std)
    loggers = _loggers(cfg)
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=_callbacks(cfg) if fit else [],
        plugins=[AtomicCheckpointIO()], enable_checkpointing=fit,
    )  # fmt: skip
    for lg in loggers:
        lg.log_hyperparams(_resolved_without_hydra(cfg))
    return {"backbone": backbone, "method": method, "module": module, "datamodule": datamodule,
            "trainer": trainer, "loggers": loggers}  # fmt: skip


def _report(cfg: DictConfig, results: dict[str, dict[str, float]], title: str) -> None:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", results)
    protocol = _protocol(cfg)
    # provenance for vlmad.report (sweeps, comparisons); transductive results carry their protocol everywhere
    write_run_json(out, {**run_info(cfg, status="done"), "protocol": protocol})
    print(format_table(results, title=title), flush=True)
    log.info("metrics written to %s", out / "metrics.csv")
    log_test_report(out, title, protocol=protocol)  # per-category table and heatmaps to the active W&B run, if any


def _protocol(cfg: DictConfig) -> str | None:
    """The method's protocol label (e.g. MuSc's transductive zero-shot), None for per-image methods."""
    from hydra.utils import get_class

    return get_class(cfg.method._target_).protocol_of(cfg.method)


def _title(cfg: DictConfig, data_key: str) -> str:
    k = cfg.method.get("k_shot", 0)
    weights = cfg.backbone.pretrained or "RANDOM WEIGHTS (pipeline check, not method quality)"
    return (f"{cfg.method._target_.rsplit('.', 1)[-1]} k_shot={k} on {cfg[data_key]._target_.rsplit('.', 1)[-1]} "
            f"| {cfg.backbone.model_name} [{weights}] | {cfg.backbone.image_size}px"
            + (f" | {_protocol(cfg)}" if _protocol(cfg) else ""))  # fmt: skip


def _finish_loggers(objects: dict[str, Any]) -> None:
    # Finish whatever W&B run is active, not only the built loggers': build may fail after the run started
    # (objects is then empty). Exit code 1 when an exception is leaving the calling evaluate/train.
    finish_wandb(sys._getframe(1))


def evaluate(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Evaluate a (trained or training-free) method on ``cfg.data`` per category.

    Returns:
        per-category metrics incl. the ``mean`` row, and the built objects.
    """
    objects: dict[str, Any] = {}
    try:
        objects = build(cfg, fit=False)
        if cfg.get("ckpt_path"):
            load_method_weights(objects["method"], cfg.ckpt_path)
        elif objects["method"].trainable:
            log.warning("evaluating %s without ckpt_path: its learned parts are at their initial values",
                        type(objects["method"]).__name__)  # fmt: skip
        objects["trainer"].test(objects["module"], datamodule=objects["datamodule"], verbose=False)
        results = objects["module"].results
        _report(cfg, results, _title(cfg, "data"))
        return results, objects
    finally:
        _finish_loggers(objects)


def train(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Fit the method's learned parts on ``cfg.data`` (its test split), then test on ``cfg.test_data``.

    ``ckpt_path`` resumes an interrupted run from its ``last.ckpt``.
    """
    objects: dict[str, Any] = {}
    try:
        objects = build(cfg, fit=True)
        if not objects["method"].trainable:
            raise ValueError(f"{cfg.method._target_} has nothing to train; use evaluate.py")
        trainer, module = objects["trainer"], objects["module"]
        trainer.fit(module, datamodule=objects["datamodule"], ckpt_path=cfg.get("ckpt_path"))
        results: dict[str, dict[str, float]] = {}
        if cfg.get("test_after_fit", True):
            trainer.test(module, datamodule=objects["datamodule"], verbose=False)
            results = module.results
            _report(cfg, results, _title(cfg, "test_data"))
        return results, objects
    finally:
        _finish_loggers(objects)
