"""The ``vlmad`` command: ``vlmad train|evaluate|predict|export|report ...`` with the same Hydra overrides.

``vlmad train method=anomalyclip data=visa`` is ``python train.py method=anomalyclip data=visa`` from a checkout:
same configs (shipped in the package), same run folders under the current directory's ``outputs/``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from hydra.errors import CompactHydraException, ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig

from vlmad.config import CONF_DIR
from vlmad.errors import DEBUG_ENV, exit_on_unknown_choice, exit_on_user_error, in_multirun, one_line, user_error
from vlmad.logs import quiet, to_log_file

log = logging.getLogger(__name__)

USAGE = """usage: vlmad COMMAND [HYDRA OVERRIDES ...]

commands:
  train      fit a method's learned parts, then test zero-shot   (= python train.py ...)
  evaluate   evaluate a method per category                      (= python evaluate.py ...)
  predict    score new images: overlays, masks, predictions.csv  (= python -m vlmad.deploy.predict)
  export     export a prepared method to ONNX / OpenVINO         (= python -m vlmad.deploy.export)
  serve      HTTP inspection service, web page, folder watch     (= python -m vlmad.deploy.serve)
  report     one table for a sweep or comparison folder          (= python -m vlmad.outputs.report DIR)
  compare    the methods side by side (experiment=comparison)    (= python -m vlmad.engine.compare)

`vlmad COMMAND --help` lists a command's config groups and options; `vlmad --version` prints the version.
"""
# modules with their own @hydra.main
HYDRA_COMMANDS = {"predict": "vlmad.deploy.predict", "export": "vlmad.deploy.export", "serve": "vlmad.deploy.serve"}
# modules with a plain argument parser: main(argv)
PLAIN_COMMANDS = {"report": "vlmad.outputs.report", "compare": "vlmad.engine.compare"}


class SweepJobFailed(CompactHydraException):
    """A multirun job failed: Hydra prints this one line (not a traceback) once the other jobs have run.

    ``code`` is the process exit status: 2 for a user error (as a single run's), 1 for anything else.
    """

    last: SweepJobFailed | None = None  # the latest one raised in this process (run_main turns it into the exit)

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message, code)
        self.code = code
        SweepJobFailed.last = self

    def __str__(self) -> str:
        return str(self.args[0])


def _sweep_job_failed(err: BaseException) -> SweepJobFailed:
    """One line naming the job, its overrides, the error and the log file that holds the traceback."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    cause = user_error(err)
    where = f"{hc.runtime.output_dir}/{hc.job.name}.log"
    overrides = " ".join(hc.overrides.task)
    message = (
        f"vlmad: error: sweep job {hc.job.num} ({overrides}) failed: {one_line(cause or err)} (details: {where}; "
        f"`vlmad report {hc.sweep.dir}` lists every failed job)"
    )
    return SweepJobFailed(message, code=2 if cause is not None else 1)


class _WithoutHydraSweepNoise:
    """stderr minus Hydra's two extra lines around a failed job's one line (its overrides list, the hint), and
    minus Hydra's several-line report of a bad override (``nosuchkey=1``), which :func:`run_main` says in one."""

    NOISE = ("Error executing job with overrides", "Set the environment variable HYDRA_FULL_ERROR")

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.config_error: BaseException | None = None  # the composition error Hydra is reporting

    def write(self, text: str) -> int:
        """Pass ``text`` on unless a job failed and it is one of Hydra's lines about it, or Hydra is reporting a
        config composition error (written while that exception is being handled: ``sys.exc_info``)."""
        handling = sys.exc_info()[1]
        if isinstance(handling, (ConfigCompositionException, OverrideParseException)):
            self.config_error = handling
            return len(text)
        if SweepJobFailed.last is not None and text.strip().startswith(self.NOISE):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _config_error_line(err: BaseException) -> str:
    """Hydra's override error and its OmegaConf cause on one line, without the ``full_key`` / ``object_type``
    detail: ``Could not override 'nosuchkey'. To append to your config use +nosuchkey=1 (Key 'nosuchkey' is not in
    struct)``."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    cause = next((line.strip() for line in str(err.__cause__ or "").splitlines() if line.strip()), "")
    return f"{text} ({cause})" if cause and cause not in text else text


def run_main(hydra_main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function; a failed sweep job ends the sweep with its one line and exit status.

    An unknown config choice (``method=winclp``) is one line listing the choices and exit status 2, before Hydra;
    an override Hydra cannot apply (``nosuchkey=1``, ``+seed=3``, ``seed=[1``) is one line and exit status 2.
    """
    exit_on_unknown_choice(CONF_DIR)
    stderr, sys.stderr = sys.stderr, _WithoutHydraSweepNoise(sys.stderr)
    try:
        hydra_main()
    except SweepJobFailed as err:  # HYDRA_FULL_ERROR=1: Hydra re-raises instead of printing
        print(err, file=stderr)
        sys.exit(err.code)
    except SystemExit as done:
        if done.code == 1 and SweepJobFailed.last is not None:  # Hydra printed the line and exits 1
            sys.exit(SweepJobFailed.last.code)
        config_error = getattr(sys.stderr, "config_error", None)
        if done.code == 1 and config_error is not None:  # a bad override: a user error like the others
            print(f"vlmad: error: {_config_error_line(config_error)}", file=stderr)
            sys.exit(2)
        raise
    finally:
        sys.stderr = stderr


def _data_roots_first(cfg: DictConfig) -> None:
    """Read the run's dataset trees before torch and Lightning load (~12 s of imports): a wrong root or layout is
    one line in about a second. ``run.json`` records it as ``failed``, as a failure inside the run would be.
    Only :class:`~vlmad.data.DataError` is reported here; the run itself checks everything again, in full."""
    from hydra.utils import instantiate

    from vlmad.data.records import DataError

    try:
        for node in ("data", "test_data"):
            if node in cfg and cfg[node] is not None:
                instantiate(cfg[node])
    except Exception as err:
        cause = user_error(err)  # Hydra wraps what a constructor raises
        if not isinstance(cause, DataError):
            return  # anything else is the run's to report, in its usual place
        from vlmad.outputs.report import run_info, write_run_json

        write_run_json(cfg.paths.output_dir, run_info(cfg, status="failed", error=one_line(cause)))
        raise


def _task(name: str, run: Callable[[DictConfig], tuple[dict[str, dict[str, float]], Any]]) -> Callable:
    """A Hydra task: quiet logs, a failed run's error in its log file, the mean pixel AUROC for sweepers."""

    @exit_on_user_error  # bad data, config or checkpoint: one line and exit code 2 (VLMAD_DEBUG=1: traceback)
    def task(cfg: DictConfig) -> float | None:
        quiet()
        try:
            _data_roots_first(cfg)
            metrics, _ = run(cfg)
        except Exception as err:
            to_log_file(f"{name} failed: {one_line(err)}\n{traceback.format_exc()}", logging.ERROR)
            if in_multirun() and os.environ.get(DEBUG_ENV, "") in ("", "0"):  # the other jobs go on; one line
                raise _sweep_job_failed(err) from None
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

    run_main(hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlmad`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if argv[0] in ("-V", "--version"):
        from vlmad import __version__

        print(f"vlmad {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command in PLAIN_COMMANDS:  # plain argument parsers, not Hydra apps
        importlib.import_module(PLAIN_COMMANDS[command]).main(rest)
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
        run_main(module.main)
    else:
        sys.exit(f"vlmad: error: unknown command {command!r}\n{USAGE}")


if __name__ == "__main__":
    main()
