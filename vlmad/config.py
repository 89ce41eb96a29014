"""Compose the repository's Hydra configs from Python (demo, bench, tests, notebooks) as the entry points do."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
