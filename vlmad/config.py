"""Compose the repository's Hydra configs from Python (demo, bench, tests, notebooks) as the entry points do."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
