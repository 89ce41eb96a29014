"""The ``vlmad`` command: ``vlmad train|evaluate|predict|export|report ...`` with the same Hydra overrides.

``vlmad train method=anomalyclip data=visa`` is ``python train.py method=anomalyclip data=visa`` from a checkout:
same configs (shipped in the package), same run folders under the current directory's ``outputs/``.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from vlmad.config import CONF_DIR
from vlmad.errors import exit_on_user_error, one_line
from vlmad.logs import quiet, to_log_file

log = logging.getLogger(__name__)

USAGE = """usage: vlmad COMMAND [HYDRA OVERRIDES ...]

commands:
  train      fit a method's learned parts, then test zero-shot   (= python train.py ...)
  evaluate   evaluate a method per category                      (= python evaluate.py ...)
  predict    score new images: overlays, masks, predictions.csv  (= python -m vlmad.deploy.predict)
  export     export a prepared method to ONNX / OpenVINO         (= python -m vlmad.deploy.export)
  report     one table for a sweep or comparison folder          (= python -m vlmad.outputs.report DIR)
  compare    the methods side by side (experiment=comparison)    (= python -m vlmad.engine.compare)

`vlmad COMMAND --help` lists a command's config groups and options.
"""
# modules with their own @hydra.main
HYDRA_COMMANDS = {"predict": "vlmad.deploy.predict", "export": "vlmad.deploy.export"}


def _task(name: str, run: Callable[[DictConfig], tuple[dict[str, dict[str, float]], Any]]) -> Callable:
    """A Hydra task: quiet logs, a failed run's error in its log file, the mean pixel AUROC for sweepers."""

    @exit_on_user_error  # bad data, config or checkpoint: one line and exit code 2 (VLMAD_DEBUG=1: traceback)
    def task(cfg: DictConfig) -> float | None:
        quiet()
        try:
            metrics, _ = run(cfg)
        except Exception as err:
            to_log_file(f"{name} failed: {one_line(err)}\n{traceback.format_exc()}", logging.ERROR)
            raise
        return metrics.get("mean", {}).get("pixel_auroc")

    task.__name__ = task.__qualname__ = name
    return task


def _train(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], Any]:
    from vlmad.engine.run import train

    return train(cfg)  # experiment=comparison is refused there, naming `vlmad compare`


def _evaluate(cfg: DictConfig) -> tuple[dict[str, dict[str, float]], Any]:
    from vlmad.engine.run import evaluate

    return evaluate(cfg)


train_task = _task("train", _train)
evaluate_task = _task("evaluate", _evaluate)


def _hydra_run(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlmad`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command, rest = argv[0], argv[1:]
    if command in ("report", "compare"):  # plain argument parsers, not Hydra apps
        importlib.import_module(f"vlmad.{command}").main(rest)
        return
    sys.argv = [f"vlmad {command}", *rest]  # Hydra reads its overrides from sys.argv
    if command == "train":
        _hydra_run("train", train_task)
    elif command == "evaluate":
        _hydra_run("evaluate", evaluate_task)
    elif command in HYDRA_COMMANDS:
        quiet()
        try:
            module = importlib.import_module(HYDRA_COMMANDS[command])
        except ModuleNotFoundError as err:
            if (err.name or "vlmad").startswith("vlmad"):
                raise
            sys.exit(f"vlmad: error: `vlmad {command}` needs {err.name} (pip install 'vlmad[{command}]')")
        module.main()
    else:
        sys.exit(f"vlmad: error: unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    main()
