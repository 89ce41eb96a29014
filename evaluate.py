"""Evaluate a method per category: ``python evaluate.py method=winclip data=mvtec data.root=...``."""

import hydra
from omegaconf import DictConfig

from vlmad.cli import evaluate_task, run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (= ``vlmad evaluate``); returns the mean pixel AUROC for sweepers."""
    return evaluate_task(cfg)  # quiet logs; a user error: one line and exit code 2 (VLMAD_DEBUG=1: traceback)


if __name__ == "__main__":
    run_main(main)  # a failed sweep job: one line, exit 2 for a user error
