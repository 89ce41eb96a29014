"""Train a method on an auxiliary dataset, then test it zero-shot: ``python train.py method=anomalyclip data=visa``."""

import hydra
from omegaconf import DictConfig

from vlmad.cli import run_main, train_task


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (= ``vlmad train``); returns the mean pixel AUROC for sweepers."""
    return train_task(cfg)  # quiet logs; a user error: one line, exit 2 (comparisons: vlmad compare)


if __name__ == "__main__":
    run_main(main)  # a failed sweep job: one line, exit 2 for a user error
