"""Run provenance (``run.json``) and sweep reports: ``vlmad report DIR [--per-category]``.

Every run writes ``run.json`` beside its ``metrics.csv``. The report walks DIR recursively, groups the finished
runs by their setting (method, eval set, k_shot, backbone, ... — everything but the seed), prints mean ± std over
seeds (= reference draws) per metric next to the published numbers of the group's ``published`` id, writes
``report.csv`` / ``report.md`` into DIR and lists failed or incomplete jobs separately.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import platform
import socket
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from vlmad.config import target_name
from vlmad.io import atomic_write, atomic_write_json
from vlmad.metrics.published import PUBLISHED, lookup
from vlmad.metrics.table import MEAN_ROW, read_csv, render_table
from vlmad.outputs.columns import GROUP_FIELDS, cell, display_columns, natural_key

RUN_JSON = "run.json"
# overrides left out of the `extra` group field: the seed is what we average over, some do not change the numbers,
# the rest are already group fields of their own (method, data, backbone, ...)
_NOT_A_SETTING = (
    "seed",
    "experiment",
    "ckpt_path",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.enable_progress_bar",
    "datamodule.num_workers",
    "datamodule.batch_size",
    "published",
    "method",
    "method.k_shot",
    "trainer.max_epochs",
    "datamodule.mask_resize",
    "module.metrics.pixel_size",
    "module.metrics.aupro_mode",
    "run_name",
    "tags",
    "module.feature_cache",
    "module.num_overlays",
    "module.save_all_overlays",
    "module.threshold.calibrate",
    "module.threshold.quantile",
    "module.threshold.max_images",
    "module.threshold.max_share",
)
_NOT_A_SETTING_TREE = ("paths", "hydra", "backbone", "data", "test_data", "logger")  # the node and all its keys


# ----------------------------------------------------------------------------------------------- run.json
def _dataset(node: DictConfig) -> str:
    """``MVTec`` / ``VisA`` / ``Synthetic[mvtec]`` / ``Folder``."""
    return target_name(node) + (f"[{node.layout}]" if node.get("layout") else "")


def _hydra_node(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get()
    return cfg.get("hydra")


def run_info(cfg: DictConfig, status: str = "done", **extra: Any) -> dict[str, Any]:
    """Provenance of a composed run config (train when it has a ``test_data`` node, else evaluate).

    Args:
        cfg: the run's composed config.
        status: ``running`` | ``done`` | ``failed``.
        extra: further fields (e.g. ``error``).

    Returns:
        A JSON-serialisable dict.
    """
    fit = "test_data" in cfg
    target = cfg.test_data if fit else cfg.data
    hydra = _hydra_node(cfg)
    choices = OmegaConf.to_container(hydra.runtime.choices) if hydra is not None else {}
    overrides = list(hydra.overrides.task) if hydra is not None else []
    metrics = cfg.module.get("metrics") or {}
    return {
        "status": status,
        "task": cfg.get("task_name"),
        "method": target_name(cfg.method),
        "member": cfg.get("member"),  # a comparison member's label (vlmad compare), else None
        "eval_set": _dataset(target),
        "eval_root": str(target.get("root")),
        "eval_categories": OmegaConf.to_container(target.categories) if target.get("categories") else None,
        "fit_set": _dataset(cfg.data) if fit else None,
        "fit_root": str(cfg.data.get("root")) if fit else None,
        "max_epochs": cfg.trainer.get("max_epochs") if fit else None,
        "ckpt_path": cfg.get("ckpt_path"),
        "backbone": cfg.backbone.model_name,
        "pretrained": cfg.backbone.pretrained,
        "image_size": cfg.backbone.image_size,
        "k_shot": cfg.method.get("k_shot", 0),
        "seed": cfg.get("seed"),
        "experiment": choices.get("experiment"),
        "published": cfg.get("published"),
        "pixel_size": metrics.get("pixel_size"),
        "mask_resize": cfg.datamodule.get("mask_resize"),
        "aupro_mode": metrics.get("aupro_mode"),
        "choices": choices,
        "overrides": overrides,
        "output_dir": str(cfg.paths.output_dir),
        "time": datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **_timing(cfg.paths.output_dir, status),
        **_devices(cfg),
        "versions": package_versions(),
        "git_sha": git_sha(),
        **extra,
    }


# the packages whose versions change numbers or behaviour (those installed are recorded)
_PACKAGES = ("vlmad", "torch", "torchvision", "open_clip_torch", "timm", "lightning", "hydra-core", "numpy")


@functools.cache
def package_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.14.1", ...}`` for the installed packages of ``_PACKAGES``."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


@functools.cache
def git_sha() -> str | None:
    """The commit of the checkout vlmad runs from (``<sha>+dirty`` with uncommitted changes); None when installed."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    git = ["git", "-C", str(root)]
    try:
        sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _timing(out_dir: str | os.PathLike, status: str) -> dict[str, Any]:
    """``started`` (kept from the run's first run.json) and, once it ended, ``duration_s``."""
    now = datetime.now()
    started = None
    if status != "running":
        try:
            started = json.loads((Path(out_dir) / RUN_JSON).read_text()).get("started")
        except (OSError, ValueError, AttributeError):
            started = None
    started = started or now.isoformat(timespec="milliseconds")
    if status == "running":
        return {"started": started}
    return {"started": started, "duration_s": round((now - datetime.fromisoformat(started)).total_seconds(), 1)}


def _devices(cfg: DictConfig) -> dict[str, Any]:
    """The trainer's accelerator, devices and precision as configured, and the GPU names when torch sees any."""
    import sys

    trainer = cfg.get("trainer") or {}
    out = {k: trainer.get(k) for k in ("accelerator", "devices", "precision")}
    torch = sys.modules.get("torch")  # never imported for this: run.json is written by runs that have it loaded
    if torch is not None and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def write_run_json(out_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Atomically write ``run.json`` into ``out_dir``."""
    return atomic_write_json(Path(out_dir) / RUN_JSON, info)


# ------------------------------------------------------------------------------------------------ collect
def _setting(override: str) -> str | None:
    """An override that distinguishes settings, without ``+``/``++``/``~`` prefixes; None if it does not."""
    text = override.lstrip("+~")
    key = text.split("=", 1)[0]
    if key in _NOT_A_SETTING or key.split(".", 1)[0] in _NOT_A_SETTING_TREE:
        return None
    return text


def collect(root: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Find the runs under ``root``.

    A run is a folder holding ``run.json`` or a Hydra ``.hydra/`` folder (written when a job starts, so a job
    that crashed before reporting is still found); folders of a comparison driver are skipped.

    Returns:
        (finished runs with their ``info`` and ``rows``, failed/incomplete runs with a ``reason``).
    """
    root = Path(root)
    dirs = {p.parent for p in root.rglob(RUN_JSON)} | {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    done, failed = [], []
    for d in sorted(dirs, key=lambda p: natural_key(p.relative_to(root).as_posix())):
        if (d / "comparison.json").exists():
            continue
        info, unreadable = _read_run_json(d)
        overrides = info.get("overrides") or [] if info else _hydra_overrides(d)
        entry = {"dir": str(d.relative_to(root)) or ".", "info": info or {}, "overrides": overrides}
        if unreadable:
            failed.append({**entry, "reason": f"unreadable run.json: {unreadable}{_finished(d)}"})
            continue
        if info and info.get("status") == "done" and (d / "metrics.csv").exists():
            try:
                entry["rows"] = read_csv(d / "metrics.csv")
            except ValueError as err:  # DataError: one line naming the file and the problem
                failed.append({**entry, "reason": f"done: unreadable metrics.csv: {err}"})
                continue
            entry["info"]["extra"] = " ".join(sorted(filter(None, map(_setting, overrides))))
            done.append(entry)
        else:
            status = (info or {}).get("status", "no run.json")
            reason = (info or {}).get("error") or ("no metrics.csv" if status != "done" else "metrics.csv missing")
            if status == "running" and _gone(info):
                status, reason = "killed", f"run.json still says running but process {info.get('pid')} is gone"
            failed.append({**entry, "reason": f"{status}: {reason}{_finished(d)}"})
    return done, failed


def _read_run_json(job_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(run.json's content or None when there is none, the problem when it cannot be read)."""
    path = job_dir / RUN_JSON
    if not path.exists():
        return None, None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"{path}: {type(err).__name__}: {err}"
    if not isinstance(info, dict):
        return None, f"{path}: not a JSON object"
    return info, None


def _gone(info: dict[str, Any]) -> bool:
    """Whether a ``running`` job's process is known to be gone (same host, no such pid): it was killed."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _finished(job_dir: Path) -> str:
    """``; finished: a, b (metrics.rank0.csv, ...)``: the categories an incomplete job had finished, if any."""
    files = [job_dir / "metrics.csv"] if (job_dir / "metrics.csv").exists() else []
    files = files or sorted(job_dir.glob("metrics.rank*.csv"), key=lambda p: natural_key(p.name))
    categories: list[str] = []
    for path in files:
        try:
            categories += [c for c in read_csv(path) if c != MEAN_ROW and c not in categories]
        except (OSError, ValueError):
            continue
    if not categories:
        return ""
    return f"; finished: {', '.join(categories)} ({', '.join(p.name for p in files)})"


def _hydra_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.exists() else []


# ------------------------------------------------------------------------------------------------- report
def _stats(values: Iterable[float], ddof: int) -> tuple[float, float, int]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not arr.size:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=ddof)) if arr.size > max(ddof, 1) else math.nan, int(arr.size)


def aggregate(runs: list[dict[str, Any]], per_category: bool = False, ddof: int = 0) -> list[dict[str, Any]]:
    """One row per group (x category): mean / std over the group's runs, plus the published numbers.

    Args:
        runs: finished runs from `collect`.
        per_category: also one row per category (the mean row is always there).
        ddof: 0 = numpy's default (population) std; 1 = sample std.

    Returns:
        Rows with the group fields, ``category``, ``n``, ``seeds``, ``<metric>``, ``<metric>_std`` and
        ``<metric> (paper)`` / ``<metric>_std (paper)`` where published.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(str(run["info"].get(f)) for f in GROUP_FIELDS), []).append(run)
    out = []
    for _, members in sorted(groups.items(), key=lambda item: [natural_key(v) for v in item[0]]):
        fields = {f: members[0]["info"].get(f) for f in GROUP_FIELDS}
        fields = {f: ",".join(map(str, v)) if isinstance(v, list) else v for f, v in fields.items()}
        categories = list(dict.fromkeys(c for m in members for c in m["rows"] if c != MEAN_ROW))
        paper = lookup(fields["published"])
        paper_std = {k: v / 100 for k, v in PUBLISHED[fields["published"]].std.items()} if paper else {}
        for category in [*(categories if per_category else []), MEAN_ROW]:
            row: dict[str, Any] = {
                **fields,
                "category": category,
                "n": len(members),
                "seeds": " ".join(str(m["info"].get("seed")) for m in members),
            }
            metrics = list(dict.fromkeys(k for m in members for k in m["rows"].get(category, {})))
            for metric in metrics:
                mean, std, _ = _stats((m["rows"].get(category, {}).get(metric, math.nan) for m in members), ddof)
                row[metric], row[f"{metric}_std"] = mean, std
                if metric in paper.get(category, {}):
                    row[f"{metric} (paper)"] = paper[category][metric]
                    if category == MEAN_ROW and metric in paper_std:
                        row[f"{metric}_std (paper)"] = paper_std[metric]
            out.append(row)
    return out


def format_report(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The aggregated rows as a fixed-width text table or a markdown table (percent, mean ± std)."""
    group_cols, metric_cols = display_columns(rows)
    columns = [*group_cols, *metric_cols]
    cells = [[cell(r, c) for c in columns] for r in rows]
    return render_table(columns, cells, markdown=markdown, n_left=len(group_cols))


def _format_failed(failed: list[dict[str, Any]]) -> str:
    return "\n".join(f"- {f['dir']}: {f['reason']} ({' '.join(f['overrides'])})" for f in failed)


def report(root: str | os.PathLike, per_category: bool = False, ddof: int = 0) -> dict[str, Any]:
    """Gather ``root``, write ``report.csv`` and ``report.md`` into it and print the table.

    Returns:
        {"rows": aggregated rows, "runs": finished runs, "failed": failed or incomplete runs}.
    """
    root = Path(root)
    runs, failed = collect(root)
    rows = aggregate(runs, per_category=per_category, ddof=ddof)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(root / "report.csv", text.getvalue())
    n_groups = len({tuple(str(r[f]) for f in GROUP_FIELDS) for r in rows})
    title = f"{len(runs)} finished run(s) in {n_groups} group(s); mean ± std over seeds (percent); (paper) = published"
    md = [f"**{title}**", "", format_report(rows, markdown=True) if rows else "(no finished runs)"]
    text = [title, format_report(rows) if rows else "(no finished runs)"]
    if failed:
        md += ["", f"**Failed or incomplete ({len(failed)})**", "", _format_failed(failed)]
        text += ["", f"Failed or incomplete ({len(failed)}):", _format_failed(failed)]
    atomic_write(root / "report.md", "\n".join(md) + "\n")
    print("\n".join(text), flush=True)
    return {"rows": rows, "runs": runs, "failed": failed}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``vlmad report DIR [--per-category] [--ddof 1]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a sweep directory (multirun/...), a comparison or any folder of runs")
    parser.add_argument("--per-category", action="store_true", help="one row per category, not only the mean")
    parser.add_argument("--ddof", type=int, default=0, help="std degrees of freedom (0: numpy default)")
    args = parser.parse_args(argv)
    if not Path(args.dir).is_dir():
        print(f"vlmad: error: {args.dir}: no such folder (a sweep or run folder is expected)", file=sys.stderr)
        sys.exit(2)
    result = report(args.dir, per_category=args.per_category, ddof=args.ddof)
    from vlmad.outputs.html import write_sweep_report

    print(f"report written to {write_sweep_report(args.dir, result)}", flush=True)
    return result


if __name__ == "__main__":
    main()
