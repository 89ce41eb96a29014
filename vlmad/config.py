"""Compose the repository's Hydra configs from Python (demo, bench, tests, notebooks) as the entry points do."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _conf_dir() -> Path:
    """``conf/``: inside the installed package (a wheel), else the checkout's top-level folder.

    In a checkout ``vlmad/conf`` is a symlink to ``../conf`` (what the wheel build copies), so both resolve
    to the same files; the fallback covers a checkout whose file system dropped the symlink.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged.resolve() if (packaged / "train.yaml").is_file() else Path(__file__).resolve().parents[1] / "conf"


CONF_DIR = _conf_dir()


_FRESH: dict[str, str] = {}  # this process's answers: one run folder per run, however often it is resolved


def fresh_dir(path: str) -> str:
    """``path``, or ``path-1``, ``path-2``, ...: the first that did not exist, created now.

    ``mkdir`` without ``exist_ok`` is atomic, so two runs started in the same second can never share (and
    overwrite) a run folder. Registered as the ``fresh_dir`` resolver with ``use_cache``: a config resolves it
    once, and Hydra copies that cache into every job of a sweep.
    """
    if path in _FRESH:  # the same run asks again (e.g. a copy of the config without the resolver cache)
        return _FRESH[path]
    base = Path(path)
    for i in range(100_000):
        candidate = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir(parents=True)
            _FRESH[path] = str(candidate)
            return _FRESH[path]
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder next to {base}")


OmegaConf.register_new_resolver("fresh_dir", fresh_dir, use_cache=True, replace=True)


def stdout_is_tty() -> bool:
    """Whether stdout is a terminal: progress bars redraw with ``\\r``, which only a terminal renders."""
    return sys.stdout.isatty()


_SWEPT = re.compile(r"^(?:range|choice|glob|interval)\(|^[^\[\]{}]*,")  # a sweep: a,b,c or range(...) etc.


def swept_keys(argv: list[str] | None = None) -> set[str]:
    """The keys a multirun sweeps over on its command line (``method.k_shot=0,1,2`` -> ``method.k_shot``)."""
    items = [a.lstrip("+~") for a in (sys.argv[1:] if argv is None else argv) if "=" in a and not a.startswith("-")]
    return {k for k, v in (a.split("=", 1) for a in items) if _SWEPT.search(v)}


def job_dirname(num: int | str, overrides: object, limit: int = 120) -> str:
    """A sweep job's folder: ``3_method.k_shot=2,seed=1``: its number, then the values of the swept keys.

    Args:
        num: ``hydra.job.num``.
        overrides: ``hydra.overrides.task`` (the job's ``key=value`` list); only swept keys are kept (all of
            them when the command line shows no sweep, e.g. another launcher), paths and roots never.
        limit: longest name kept; a longer one is cut (the number keeps it unique).

    Returns:
        ``<num>_<key=value,...>`` made file-system safe, or ``<num>`` when nothing is left.
    """
    pairs = [str(o).lstrip("+~").split("=", 1) for o in (overrides or []) if "=" in str(o)]
    swept = swept_keys()
    kept = [f"{k}={v}" for k, v in pairs if (k in swept or not swept) and not k.endswith(_PATH_KEYS)]
    safe = re.sub(r"[^A-Za-z0-9._=,+\-]+", "_", ",".join(kept)).strip("_")[:limit]
    return f"{num}_{safe}" if safe else str(num)


_PATH_KEYS = ("root", "dir", "path", "input", "references", "model", "output_dir", "data_dir", "feature_cache")


def model_run_name(backend: str, model: str | None, default: str) -> str:
    """A predict run's name: ``default`` (method-backbone) for torch; from the export's manifest otherwise.

    An exported model's folder says what it holds (``anomalyclip-ViT-B-16-plus-240-onnx``), whatever the
    (ignored) ``method=`` / ``backbone=`` defaults are; ``<backend>-<folder name>`` when the manifest is unreadable.
    """
    if backend == "torch" or not model:
        return default
    try:
        info = json.loads((Path(model) / "vlmad_model.json").read_text())
        name = f"{info['method']}-{info['backbone']['model_name']}".lower()
    except (OSError, ValueError, KeyError, TypeError):
        name = Path(model).name
    return re.sub(r"[^\w.+-]", "_", f"{name}-{backend}")


OmegaConf.register_new_resolver("stdout_is_tty", stdout_is_tty, replace=True)
OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
OmegaConf.register_new_resolver("model_run_name", model_run_name, replace=True)


def compose(config_name: str, overrides: list[str], output_dir: str | Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, writing into ``output_dir``.

    The hydra node is kept and registered, so ``${hydra:runtime.choices...}`` (run names, tags) resolve as
    in a real run.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, [*overrides, f"paths.output_dir={output_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def target_name(node: object) -> str:
    """The class or function name of a config node's ``_target_`` (or of a dotted path): ``WinCLIP``, ``MVTec``."""
    target = node if isinstance(node, str) else node._target_  # type: ignore[attr-defined]
    return str(target).rsplit(".", 1)[-1]
