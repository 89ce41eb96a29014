"""``train(cfg)`` / ``evaluate(cfg)``: explicit wiring of backbone, method, module, data and trainer."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vlmad.config import target_name  # (importing vlmad.config registers the resolvers that conf/hydra uses)
from vlmad.data import validate_data
from vlmad.engine.checkpoint import atomic_torch_save, load_method_weights, read_checkpoint, remove_partial_writes
from vlmad.engine.ranks import RankFailedError, RankObserver, Stopped, clear_rank_failures, record_rank_failure, watched
from vlmad.errors import ConfigError, in_multirun, one_line
from vlmad.logs import to_log_file
from vlmad.metrics.table import format_table, write_csv
from vlmad.outputs.loggers import finish_wandb, log_test_report
from vlmad.outputs.report import run_info, write_run_json

log = logging.getLogger(__name__)

COMPARISON_HINT = (
    "a comparison runs several methods: `vlmad compare experiment=<comparison|demo> ...` ({script} runs one method)"
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename, so a killed run never leaves a torn checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """torch.save to ``path.<pid>.tmp`` then ``os.replace``."""
        atomic_torch_save(checkpoint, path)


def _resolved_without_hydra(cfg: DictConfig) -> dict:
    # configs composed in Python keep the hydra node, whose sweep keys cannot resolve outside a multirun
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }


def _loggers(cfg: DictConfig) -> list:
    # W&B runs start lazily (first log_hyperparams in build), in the mode vlmad.outputs.loggers.wandb_mode picks
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def _callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def _check_devices(cfg: DictConfig) -> None:
    """Refuse several devices inside a local multirun job: Lightning's DDP children would re-run the script with
    ``hydra.run.dir`` and write their categories outside the job's sweep folder. SLURM jobs start their ranks."""
    devices = cfg.trainer.get("devices", 1)
    several = (
        devices == -1 or (isinstance(devices, int) and devices > 1) or (OmegaConf.is_list(devices) and len(devices) > 1)
    )
    if several and in_multirun() and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.devices={devices} in a local multirun job is not supported (DDP children would write outside "
            "the job folder): sweep with hydra/launcher=slurm hydra.launcher.tasks_per_node=N, or run each job alone"
        )


def build(cfg: DictConfig, fit: bool) -> dict[str, Any]:
    """Instantiate the data, then backbone -> method -> module, the datamodule and the trainer.

    The datasets come first: a wrong data root or a damaged file is reported in seconds, before a ViT-L loads.
    """
    _check_devices(cfg)
    L.seed_everything(cfg.seed, workers=True)
    test_set = instantiate(cfg.test_data if fit else cfg.data)
    fit_set = instantiate(cfg.data) if fit else None
    # every image opens, masks fit, enough normal images for k: all problems in one error, before any scoring
    minimum = get_class(cfg.method._target_).min_test_images(cfg.method)  # e.g. MuSc's mutual scoring: 5
    validate_data(test_set, int(cfg.method.get("k_shot", 0)), fit_set, cfg.datamodule.get("fit_split", "test"), minimum)
    backbone = instantiate(cfg.backbone)
    method = instantiate(cfg.method, backbone=backbone)
    module = instantiate(cfg.module, method=method)
    sets = {"test_set": test_set, **({"fit_set": fit_set} if fit else {})}
    datamodule = instantiate(cfg.datamodule, **sets, **backbone.preprocess_config())  # size, mean, std: one source
    if module.feature_cache is not None and str(cfg.trainer.get("precision", "32")) in ("32", "32-true"):
        # fp32 keys: a mixed-precision run reads its own entries in the main process instead
        datamodule.feature_reader = module.feature_cache.worker_reader(method)
    loggers = _loggers(cfg)
    trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=_callbacks(cfg) if fit else [],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=fit,
    )
    for lg in loggers:
        lg.log_hyperparams(_resolved_without_hydra(cfg))
    return {
        "backbone": backbone,
        "method": method,
        "module": module,
        "datamodule": datamodule,
        "trainer": trainer,
        "loggers": loggers,
    }


def _report(cfg: DictConfig, results: dict[str, dict[str, float]], title: str) -> None:
    if rank_zero_only.rank != 0:  # every rank holds the gathered results; rank 0 writes them
        return
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", results)
    protocol = _protocol(cfg)
    # provenance for vlmad.outputs.report (sweeps, comparisons); transductive results carry their protocol everywhere
    write_run_json(out, {**run_info(cfg, status="done"), "protocol": protocol})
    table = format_table(results, title=title)
    print(table, flush=True)
    to_log_file(table)  # the table in <run dir>/<task>.log too, without printing it twice
    log.info("metrics written to %s", out / "metrics.csv")
    # per-category table (from memory) and this run's heatmap panels to the active W&B run, if any
    log_test_report(results, title, out / "heatmaps", protocol=protocol)
    from vlmad.outputs.html import write_run_report

    log.info("report written to %s", write_run_report(out))  # table, curves, heatmaps: one self-contained file


def _protocol(cfg: DictConfig) -> str | None:
    """The method's protocol label (e.g. MuSc's transductive zero-shot), None for per-image methods."""
    from hydra.utils import get_class

    return get_class(cfg.method._target_).protocol_of(cfg.method)


def _title(cfg: DictConfig, data_key: str) -> str:
    k = cfg.method.get("k_shot", 0)
    weights = cfg.backbone.pretrained or "RANDOM WEIGHTS (pipeline check, not method quality)"
    return (
        f"{target_name(cfg.method)} k_shot={k} on {target_name(cfg[data_key])} "
        f"| {cfg.backbone.model_name} [{weights}] | {cfg.backbone.image_size}px"
        + (f" | {_protocol(cfg)}" if _protocol(cfg) else "")
    )


def task(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task like lightning-hydra-template's ``task_wrapper``: ``run.json`` says ``running``, then ``done``
    (written with the metrics) or ``failed`` with the error; the W&B run is always finished (exit code 1 on
    failure), so the next job of a multirun never attaches to it.
    """

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        out = Path(cfg.paths.output_dir)
        record = rank_zero_only.rank == 0  # several devices: one process writes the run's files
        if record:
            clear_rank_failures(out)  # an earlier run's failed ranks, in a folder run into again
            write_run_json(out, run_info(cfg, status="running"))
        try:
            with watched(out):  # SIGTERM / SIGINT / a failed child rank become exceptions here
                result = fn(cfg)
        except BaseException as err:
            finish_wandb(failed=True)
            _failed(cfg, out, err)
            raise
        if record and _status(out) == "running":  # a run that reports nothing (train with test_after_fit=false)
            write_run_json(out, run_info(cfg, status="done"))
        finish_wandb(failed=False)
        return result

    return wrapper


def _status(out: Path) -> str | None:
    import json

    try:
        return json.loads((out / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _distributed_error(err: BaseException) -> bool:
    """An error of a collective whose peer went away (how rank 0 learns that another rank died)."""
    text = str(err).lower()
    return type(err).__name__.startswith("Dist") or any(w in text for w in ("gloo", "nccl", "connection closed"))


def _failed(cfg: DictConfig, out: Path, err: BaseException) -> None:
    """Record a failure; a signal or another rank's failure ends the process here with one console line.

    Child ranks write their own error for rank 0 (``run.rank<r>.json``) and exit quietly; rank 0 writes ``run.json``
    with the cause (the failed rank's error, not its own "Connection closed by peer").
    """
    rank = rank_zero_only.rank
    code = err.exit_code if isinstance(err, Stopped) else 1
    if rank != 0:
        if not isinstance(err, (Stopped, RankFailedError)) and not _distributed_error(err):
            record_rank_failure(out, rank, err)
        raise SystemExit(code) from None  # rank 0 says why, once
    observer, cause = RankObserver.active, None
    if observer is not None:  # several devices on this machine: rank 0 started the others
        another = isinstance(err, RankFailedError) or _distributed_error(err)
        child = observer.settle(wait_s=5.0 if another else 0.0)  # also stops the children still running
        cause = child if another else None
        RankObserver.active = None
    message = str(err) if isinstance(err, Stopped) else (cause or one_line(err))
    write_run_json(out, run_info(cfg, status="failed", error=message))
    if isinstance(err, Stopped):
        print(f"vlmad: {message}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    if cause is not None or isinstance(err, RankFailedError):
        print(f"vlmad: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


@task
def evaluate(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Evaluate a (trained or training-free) method on ``cfg.data`` per category.

    Returns:
        per-category metrics incl. the ``mean`` row, and the built objects.
    """
    if "comparison" in cfg:
        raise ConfigError(COMPARISON_HINT.format(script="evaluate.py"))
    checkpoint = read_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None  # a bad file fails in seconds
    objects = build(cfg, fit=False)
    if checkpoint is not None:
        load_method_weights(objects["method"], cfg.ckpt_path)
    elif objects["method"].trainable:
        log.warning(
            "evaluating %s without ckpt_path: its learned parts are at their initial values",
            type(objects["method"]).__name__,
        )
    objects["trainer"].test(objects["module"], datamodule=objects["datamodule"], verbose=False)
    results = objects["module"].results
    _report(cfg, results, _title(cfg, "data"))
    return results, objects


@task
def train(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Fit the method's learned parts on ``cfg.data`` (its test split), then test on ``cfg.test_data``.

    ``ckpt_path`` resumes an interrupted run from its ``last.ckpt``.
    """
    if "comparison" in cfg:
        raise ConfigError(COMPARISON_HINT.format(script="train.py"))
    if cfg.get("test_data") is None:
        raise ConfigError(
            f"{cfg.data.get('root')}: fitting on your own data has no default test set; name one, e.g. "
            "test_data=folder test_data.root=... (testing on the fitted split would score the images it "
            "learned)"
        )
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)  # a missing or truncated file fails in seconds, naming it
        for stale in remove_partial_writes(Path(cfg.ckpt_path).parent):
            log.warning("removed %s: a partial checkpoint write of a run killed while saving", stale)
    from hydra.utils import get_class

    if not get_class(cfg.method._target_).trainable:  # before any backbone is loaded
        raise ConfigError(f"{cfg.method._target_} has nothing to train; use evaluate.py")
    objects = build(cfg, fit=True)
    trainer, module = objects["trainer"], objects["module"]
    trainer.fit(module, datamodule=objects["datamodule"], ckpt_path=cfg.get("ckpt_path"))
    results: dict[str, dict[str, float]] = {}
    if cfg.get("test_after_fit", True):
        trainer.test(module, datamodule=objects["datamodule"], verbose=False)
        results = module.results
        _report(cfg, results, _title(cfg, "test_data"))
    return results, objects
