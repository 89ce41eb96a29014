"""Weights & Biases: an offline-unless-logged-in WandbLogger, end-of-test tables and heatmaps, a safe finish."""

from __future__ import annotations

import math
import netrc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlmad.metrics.names import METRIC_NAMES
from vlmad.metrics.table import MEAN_ROW


def _netrc_has_key() -> bool:
    """Whether ``~/.netrc`` (or ``$NETRC``) holds a login for the W&B API host (where ``wandb login`` writes)."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode() -> str:
    """The W&B mode for this process: an explicit ``WANDB_MODE`` wins, else online only when an API key is found.

    Returns:
        ``WANDB_MODE`` if set (e.g. ``disabled``), ``online`` with ``WANDB_API_KEY`` or a netrc entry, else
        ``offline`` (so a machine without credentials or network never blocks on a login prompt).
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_key() else "offline"


def make_wandb_logger(
    tags: Sequence[str] = (),
    extra_tags: Sequence[str] = (),
    offline: bool = False,
    save_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Any:
    """A ``WandbLogger`` whose run mode comes from :func:`wandb_mode`; the run itself starts on first use.

    Args:
        tags: run tags (the primary config's Hydra choices).
        extra_tags: appended to ``tags`` (e.g. ``k0``, ``seed1``: YAML cannot concatenate lists).
        offline: always offline; otherwise :func:`wandb_mode` decides.
        save_dir: the run's files go to ``<save_dir>/wandb/``.
        **kwargs: the rest of ``WandbLogger``'s and ``wandb.init``'s arguments (project, name, group, ...).

    Returns:
        A ``lightning.pytorch.loggers.WandbLogger``.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = "offline" if offline else wandb_mode()
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    # `mode` goes to wandb.init rather than WandbLogger(offline=True), which would rewrite os.environ
    # for every later job of a multirun
    return WandbLogger(save_dir=save_dir, tags=[str(t) for t in [*tags, *extra_tags]], mode=mode, **kwargs)


def active_run() -> Any:
    """The current ``wandb.run`` if wandb was imported and a run is active, else None (never imports wandb)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def log_test_report(
    results: Mapping[str, Mapping[str, float]],
    title: str,
    panels: Mapping[str, Sequence[str | os.PathLike]] | str | os.PathLike | None = None,
    images_per_category: int = 4,
    protocol: str | None = None,
) -> None:
    """Log the run's results as a ``wandb.Table`` and its heatmap panels as images to the active run.

    A no-op without an active run. Everything comes from memory (nothing is read back from ``metrics.csv``).
    Logged keys: ``test/metrics_table`` (one row per category, in ``results`` order: ``mean`` last, as in
    ``metrics.csv``) and ``test/heatmaps/<category>`` (the first ``images_per_category`` panels, captioned
    ``<category>: <name without its index>``).

    Args:
        results: {category | "mean": {metric: value}}, as ``vlmad.engine.run`` writes to ``metrics.csv``.
        title: the report's title line, stored in the run summary as ``test/title``.
        panels: {category: panel files} of this run, or the ``heatmaps`` folder they were written to
            (``<folder>/<category>/*.png``); None logs no images.
        images_per_category: panels logged per category.
        protocol: evaluation-protocol label (transductive methods), stored as ``test/protocol`` and tagged.
    """
    run = active_run()
    if run is None:
        return
    import wandb

    # the columns and row order of metrics.csv (vlmad.metrics.table.write_csv), without reading it back
    extra = [m for m in dict.fromkeys(m for row in results.values() for m in row) if m not in METRIC_NAMES]
    columns = [*METRIC_NAMES, *extra]
    order = [c for c in results if c != MEAN_ROW] + ([MEAN_ROW] if MEAN_ROW in results else [])
    data = [[name, *(_cell(results[name].get(c)) for c in columns)] for name in order]
    payload: dict[str, Any] = {"test/metrics_table": wandb.Table(columns=["category", *columns], data=data)}
    for category, files in _panels(panels, [c for c in order if c != MEAN_ROW]).items():
        if files[:images_per_category]:
            # panel names are "<index>_<what>.png"; drop the index in captions
            payload[f"test/heatmaps/{category}"] = [
                wandb.Image(str(p), caption=f"{category}: {Path(p).stem.split('_', 1)[-1]}")
                for p in files[:images_per_category]
            ]
    run.log(payload)
    run.summary["test/title"] = title
    if protocol:
        run.summary["test/protocol"] = protocol
        run.tags = (*(run.tags or ()), protocol.split(" (")[0].replace(" ", "-"))  # "transductive-zero-shot"


def _cell(value: float | None) -> float | None:
    """A table cell: NaN (metric undefined, e.g. no anomalous image) as an empty cell."""
    return None if value is None or math.isnan(value) else float(value)


def _panels(
    panels: Mapping[str, Sequence[str | os.PathLike]] | str | os.PathLike | None, categories: list[str]
) -> dict[str, list[Path]]:
    """{category: panel files} from a mapping, or listed from a heatmaps folder for ``categories``."""
    if panels is None:
        return {}
    if isinstance(panels, Mapping):
        return {c: [Path(p) for p in panels.get(c, [])] for c in categories}
    return {c: sorted((Path(panels) / c).glob("*.png")) for c in categories}


def finish_wandb(failed: bool) -> None:
    """Finish the active wandb run (exit code 1 when the job failed).

    Without this, the next job of a multirun would reuse the run (``WandbLogger`` attaches to ``wandb.run``).
    """
    if active_run() is None:
        return
    import wandb

    wandb.finish(exit_code=1 if failed else 0)
