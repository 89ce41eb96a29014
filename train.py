"""Train a method on an auxiliary dataset, then test it zero-shot: ``python train.py method=anomalyclip data=visa``."""

import hydra
from omegaconf import DictConfig

from vlmad import compare
from vlmad.errors import exit_on_user_error
from vlmad.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error  # bad data, config or checkpoint: one line and exit code 2 (VLMAD_DEBUG=1: traceback)
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the mean pixel AUROC for sweepers."""
    metrics, _ = (compare.run if "comparison" in cfg else train)(cfg)  # experiment=comparison: vlmad.compare
    return metrics.get("mean", {}).get("pixel_auroc")


if __name__ == "__main__":
    main()
