"""Quiet, readable logs for runs: no open_clip notices, no Lightning tips, known deprecations hidden, warnings in
the run's log file, and text (the results table) written to the log file without repeating it on the console.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

# Lightning's "GPU available: ...", "💡 Tip: ..." and similar lines come through these loggers at INFO.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",  # "Seed set to 0" on every build
    "lightning.fabric.utilities.distributed",  # "Initializing distributed: GLOBAL_RANK: ..." once per rank
)
# Deprecations inside our dependencies that a user can do nothing about (message regexes).
KNOWN_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning/pytorch/utilities/_pytree.py with torch >= 2.9
    r"Found \d+ module\(s\) in eval mode",  # the frozen CLIP is in eval mode by design while prompts train
    # a few training batches per epoch (demo, smoke): the epoch's losses are logged and printed per epoch anyway
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # epoch-level metrics are computed from every rank's gathered predictions: the same value on every rank
    r"It is recommended to use `self\.log\(.*sync_dist=True",
)
_OPEN_CLIP = f"{os.sep}open_clip{os.sep}"
_CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding the vlmad package
# open_clip's own notice that a model is random: vlmad's RANDOM-weights warning already says it, naming the setting
_OPEN_CLIP_DUPLICATES = ("No pretrained weights loaded",)


class QuietFilter(logging.Filter):
    """Drop open_clip's INFO lines (it logs through the root logger) and its duplicate random-weights notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record not written by open_clip; of open_clip's, warnings and errors but the duplicates."""
        if _OPEN_CLIP not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(_OPEN_CLIP_DUPLICATES)


def short_path(filename: str) -> str:
    """A source file as ``package/module.py``: the part after ``site-packages`` or below vlmad's checkout."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :])
    try:
        return Path(filename).resolve().relative_to(_CHECKOUT).as_posix()
    except (ValueError, OSError):
        return filename


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``vlmad/backbones/clip.py:252: UserWarning: ...``: one line, no install path, no echoed source line."""
    text = f"{short_path(filename)}:{lineno}: {category.__name__}: {message}"
    logged = getattr(warnings.showwarning, "__module__", "") == "logging"  # captureWarnings: the handler ends lines
    return text if logged else text + "\n"


def quiet() -> None:
    """Apply vlmad's log and warning settings to this process (idempotent; entry points call it first).

    Lightning attaches its own console handlers when imported before logging is configured; in a Hydra run
    they are removed so its lines go through the root handlers, i.e. also into ``<run dir>/<task>.log``.
    Warnings are shown once per place they come from and, in a Hydra run, logged to that file too.
    """
    root = logging.getLogger()
    if not any(isinstance(f, QuietFilter) for f in root.filters):
        root.addFilter(QuietFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if root.handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
        logging.captureWarnings(True)
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = format_warning  # also used by logging.captureWarnings


def to_log_file(text: str, level: int = logging.INFO, name: str = "vlmad") -> None:
    """Write ``text`` to the log files of the root logger only (the console already showed it, e.g. printed).

    Without a file handler (no Hydra run) this does nothing.
    """
    record = logging.getLogger(name).makeRecord(name, level, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


# logger=<kind>: the Lightning logger class and the package it needs (an optional extra of vlmad)
OPTIONAL_LOGGERS = {
    "tensorboard": ("lightning.pytorch.loggers.TensorBoardLogger", ("tensorboard", "tensorboardX")),
    "mlflow": ("lightning.pytorch.loggers.MLFlowLogger", ("mlflow",)),
}


def make_logger(kind: str, **kwargs: object) -> object:
    """The Lightning logger ``kind`` (tensorboard | mlflow) built with ``kwargs``.

    Raises:
        ConfigError: its package is not installed; one line naming the extra that installs it.
    """
    import importlib
    import importlib.util

    from vlmad.errors import ConfigError

    if kind not in OPTIONAL_LOGGERS:
        raise ConfigError(f"unknown logger kind {kind!r}; expected one of {sorted(OPTIONAL_LOGGERS)}")
    target, packages = OPTIONAL_LOGGERS[kind]
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"logger={kind} needs the {packages[0]} package: pip install 'vlmad[{kind}]'")
    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)
