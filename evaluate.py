"""Evaluate a method per category: ``python evaluate.py method=winclip data=mvtec data.root=...``."""

import hydra
from omegaconf import DictConfig

from vlmad.errors import exit_on_user_error
from vlmad.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error  # bad data, config or checkpoint: one line and exit code 2 (VLMAD_DEBUG=1: traceback)
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the mean pixel AUROC for sweepers."""
    metrics, _ = evaluate(cfg)
    return metrics.get("mean", {}).get("pixel_auroc")


if __name__ == "__main__":
    main()
