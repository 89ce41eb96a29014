"""Comparison driver: several member runs on one target set, merged into one side-by-side table.

``vlmad compare data.root=<visa> test_data.root=<mvtec>`` (its own entry point, not a Hydra app:
``experiment=comparison`` by default, any experiment with a ``comparison`` node, e.g. ``experiment=demo``).
Each member of ``comparison.members`` is composed with
`vlmad.config.compose` from its own overrides plus the comparison's command-line overrides (so ``backbone=tiny``
reaches every member), gets the comparison's resolved ``data``/``test_data`` nodes (training members fit on
``data`` and test on ``test_data``; evaluate-only members evaluate ``test_data``), runs in
``<output_dir>/<member>`` and writes its own metrics.csv + run.json. The merged table goes to
``comparison.csv`` / ``comparison.md``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vlmad.config import target_name
from vlmad.metrics.published import lookup
from vlmad.metrics.table import MEAN_ROW, format_markdown, format_table, number, percent, render_table
from vlmad.outputs.report import run_info, write_run_json

log = logging.getLogger(__name__)

# command-line overrides a member does not take over: its own output dir, the comparison itself, the data nodes
# (copied resolved instead), and train-only keys for evaluate-only members
_NEVER = ("experiment", "paths.output_dir", "hydra", "data", "test_data", "comparison", "published")
_TRAIN_ONLY = (
    "trainer.max_epochs",
    "test_after_fit",
    "module.optimizer",
    "module.scheduler",
    "module.feature_cache",
    "callbacks",
)


# the random-weights test backbone of each family (conf/backbone/<name>.yaml)
TINY_BACKBONES = {"clip": "tiny", "dinov2": "tiny_dinov2"}


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _merge(*override_lists: list[str]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces the earlier one."""
    merged: dict[str, str] = {}
    for overrides in override_lists:
        for override in overrides:
            merged.pop(_key(override), None)
            merged[_key(override)] = override
    return list(merged.values())


def _conf_target(group: str, choice: str) -> str:
    from vlmad.config import CONF_DIR

    node = OmegaConf.load(CONF_DIR / group / f"{choice}.yaml")
    return str((node.get("method", node) if group == "method" else node).get("_target_", ""))


def member_family(overrides: list[str]) -> str:
    """The backbone family (``clip``, ``dinov2``) of the member's ``method=...`` (its ``backbone_families``)."""
    from hydra.utils import get_class

    method = next((o.split("=", 1)[1] for o in overrides if _key(o) == "method"), None)
    return get_class(_conf_target("method", method)).backbone_families[0] if method else "clip"


def for_backbone_family(overrides: list[str], family: str) -> list[str]:
    """The comparison's command-line overrides as a member on ``family`` backbones takes them.

    A ``backbone=<choice>`` of another family is replaced by this family's tiny test backbone when it is the other
    family's tiny one (``backbone=tiny`` reaches a DINOv2 member as ``tiny_dinov2``) and otherwise dropped (the
    member keeps its own backbone); that choice's ``backbone.*`` settings are dropped with it (sizes differ with the
    patch size).
    """
    choice = next((o.split("=", 1)[1] for o in overrides if _key(o) == "backbone"), None)
    if choice is None:
        return overrides
    theirs = "dinov2" if _conf_target("backbone", choice).endswith("DinoBackbone") else "clip"
    if theirs == family:
        return overrides
    out = [o for o in overrides if not _under(_key(o), ("backbone",))]
    if choice == TINY_BACKBONES[theirs]:
        out.append(f"backbone={TINY_BACKBONES[family]}")
    return out


def compose_member(ctx: dict[str, Any], name: str, member: DictConfig) -> DictConfig:
    """Compose one member's config in ``<output_dir>/<name>`` with the comparison's data nodes.

    Args:
        ctx: the comparison's resolved ``out``, ``data``, ``test_data``, ``choices``, ``shared`` overrides
            (its command line, applied after the member's own) and ``paper`` (attach published ids).
        name: the member's key (its sub-directory).
        member: ``{task, label, published, overrides}``.
    """
    from vlmad.config import compose

    task = member.get("task", "evaluate")
    choices = ctx["choices"]
    # the data choice behind test_data (for run names and choices; the node itself is replaced below)
    target = choices.get("data@test_data") or choices["data"]
    data_choices = (
        [f"data={target}"] if task == "evaluate" else [f"data={choices['data']}", f"test_data={choices['test_data']}"]
    )
    own = [*data_choices, *member.get("overrides", []), f"run_name={name}"]
    keep = [o for o in ctx["shared"] if task == "train" or not _under(_key(o), _TRAIN_ONLY)]
    keep = for_backbone_family(keep, member_family(member.get("overrides", [])))
    member_cfg = compose(task, _merge(own, keep), ctx["out"] / name)
    with open_dict(member_cfg):
        if task == "evaluate":
            member_cfg.data = ctx["test_data"]
        else:
            member_cfg.data, member_cfg.test_data = ctx["data"], ctx["test_data"]
        member_cfg.published = member.get("published") if ctx["paper"] else None
        member_cfg.member = member.get("label", name)  # run.json's "member": the reports label rows by it
    return member_cfg


def _target(cfg: DictConfig) -> str:
    return target_name(cfg.test_data)


def _hydra(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    return cfg.hydra if "hydra" in cfg else HydraConfig.get()


def side_by_side(results: dict[str, dict[str, dict[str, float]]], published: dict[str, str | None]) -> dict:
    """Wide table: {category | mean | "mean (paper)": {"<metric>/<member>": fraction}}, metric-major."""
    metrics = list(dict.fromkeys(m for rows in results.values() for m in rows.get(MEAN_ROW, {})))
    categories = list(dict.fromkeys(c for rows in results.values() for c in rows if c != MEAN_ROW))
    paper = {label: lookup(pid).get(MEAN_ROW, {}) for label, pid in published.items()}
    table: dict[str, dict[str, float]] = {}
    for row in [*categories, MEAN_ROW]:
        table[row] = {
            f"{m}/{label}": rows.get(row, {}).get(m, math.nan) for m in metrics for label, rows in results.items()
        }
    if any(paper.values()):
        table[f"{MEAN_ROW} (paper)"] = {
            f"{m}/{label}": paper[label].get(m, math.nan) for m in metrics for label in results
        }
    return table


def _write_wide(path: Path, table: dict[str, dict[str, float]]) -> None:
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    lines = [",".join(["category", *columns])]
    lines += [",".join([name, *(number(float(row.get(c, math.nan))) for c in columns)]) for name, row in table.items()]
    path.write_text("\n".join(lines) + "\n")


def _markdown_wide(table: dict[str, dict[str, float]], title: str) -> str:
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    cells = [
        [
            f"**{name}**" if name.startswith(MEAN_ROW) else name,
            *("" if math.isnan(row.get(c, math.nan)) else percent(row[c]) for c in columns),
        ]
        for name, row in table.items()
    ]
    return "\n".join([f"**{title}**", "", render_table(["category", *columns], cells, markdown=True)])


def run(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Run every member, then write ``comparison.csv`` / ``comparison.md``.

    Returns:
        the wide table ({category: {"<metric>/<member label>": fraction}}) and
        {"members": {label: per-category metrics}, "failed": {name: error}}.
    """
    from vlmad.engine.run import evaluate, train

    # resolve everything first: composing a member replaces the global HydraConfig that ${hydra:...} reads
    hydra, out = _hydra(cfg), Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shared = [o for o in hydra.overrides.task if not _under(_key(o), _NEVER)]
    ctx = {
        "out": out,
        "shared": shared,
        "choices": OmegaConf.to_container(hydra.runtime.choices),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "test_data": OmegaConf.to_container(cfg.test_data, resolve=True),
        "paper": cfg.comparison.get("paper_eval_set") == _target(cfg),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    published: dict[str, str | None] = {}
    failed: dict[str, str] = {}
    status = {"status": "running", "members": list(cfg.comparison.members), "overrides": shared}
    (out / "comparison.json").write_text(json.dumps(status, indent=2))
    for name, member in cfg.comparison.members.items():
        label, member_cfg = member.get("label", name), None
        try:
            member_cfg = compose_member(ctx, name, member)
            write_run_json(member_cfg.paths.output_dir, run_info(member_cfg, status="running"))
            fn = train if member.get("task", "evaluate") == "train" else evaluate
            results[label], _ = fn(member_cfg)
            published[label] = member_cfg.published
        except Exception as err:  # one failing member must not lose the others' results
            log.exception("comparison member %s failed", name)
            failed[name] = f"{type(err).__name__}: {err}"
            if member_cfg is not None:
                write_run_json(member_cfg.paths.output_dir, run_info(member_cfg, "failed", error=failed[name]))
    title = cfg.comparison.get("title", "comparison") + f" — {_target(cfg)} ({cfg.test_data.get('root')})"
    if cfg.backbone.pretrained is None and "tiny" in str(cfg.backbone.model_name):
        title += " — RANDOM-WEIGHTS tiny CLIP (pipeline check only)"
    summary = {label: rows[MEAN_ROW] for label, rows in results.items()}
    table = side_by_side(results, published)
    _write_wide(out / "comparison.csv", table)
    md = [format_markdown(summary, title=f"{title}: mean over categories"), "", _markdown_wide(table, title)]
    if failed:
        md += ["", "**Failed members:** " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    (out / "comparison.md").write_text("\n".join(md) + "\n")
    print(format_table(summary, title=f"{title}: mean over categories"), flush=True)
    print(f"side-by-side per-category table: {out / 'comparison.md'}", flush=True)
    (out / "comparison.json").write_text(
        json.dumps({**status, "status": "failed" if failed else "done", "failed": failed}, indent=2)
    )
    if failed:
        raise RuntimeError(f"comparison members failed: {failed}")
    return table, {"members": results, "failed": failed}


def compose_comparison(overrides: list[str]) -> DictConfig:
    """train.yaml with ``experiment=comparison`` (unless another experiment is given) and the overrides.

    Writes to ``paths.output_dir`` or ``hydra.run.dir`` if given (as train.py / evaluate.py), else to a fresh
    ``outputs/comparison/<time>`` (``vlmad.config.fresh_dir``: a second comparison in the same second gets ``-1``).

    Raises:
        ConfigError: the experiment has no ``comparison`` node.
    """
    from datetime import datetime

    from vlmad.config import compose, fresh_dir
    from vlmad.errors import ConfigError

    overrides = list(overrides)
    if not any(_key(o) == "experiment" for o in overrides):
        overrides.insert(0, "experiment=comparison")
    dirs = ("paths.output_dir", "hydra.run.dir")
    given = {_key(o): o.split("=", 1)[1] for o in overrides if _key(o) in dirs}
    overrides = [o for o in overrides if _key(o) not in dirs]
    out = given.get("paths.output_dir") or given.get("hydra.run.dir")
    cfg = compose("train", overrides, out or fresh_dir(f"outputs/comparison/{datetime.now():%Y-%m-%d_%H-%M-%S}"))
    if "comparison" not in cfg:
        raise ConfigError(f"{' '.join(overrides)}: no `comparison` node (use experiment=comparison or demo)")
    return cfg


def main(argv: list[str] | None = None) -> None:
    """``vlmad compare [overrides...]``: run a comparison (a user error: one line, exit code 2)."""
    import sys

    from vlmad.errors import exit_on_user_error
    from vlmad.logs import quiet

    quiet()
    exit_on_user_error(lambda: run(compose_comparison(sys.argv[1:] if argv is None else argv)))()


if __name__ == "__main__":
    main()
