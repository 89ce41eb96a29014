"""Expected user errors: one clear line and a non-zero exit instead of a traceback (``VLMAD_DEBUG=1`` shows it)."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
DEBUG_ENV = "VLMAD_DEBUG"


class VlmadError(Exception):
    """Base of the errors a user can fix (bad data, config, checkpoint, input); printed as one line."""


class ConfigError(VlmadError, ValueError):
    """A setting or combination of settings vlmad cannot run."""


def user_error(err: BaseException) -> BaseException | None:
    """The user-fixable error behind ``err`` (Hydra wraps errors raised while instantiating a config node)."""
    from hydra.errors import InstantiationException

    seen = err
    while seen is not None:
        if isinstance(seen, VlmadError):
            return seen
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:  # disk full: one line naming the folder
            where = Path(seen.filename).parent if seen.filename else "the output folder"
            return VlmadError(f"{where}: no space left on device (files written before are complete; free space)")
        if isinstance(seen, InstantiationException):
            # a constructor rejected a configured value (ValueError/TypeError): a config error
            cause = seen.__cause__
            return user_error(cause) or (cause if isinstance(cause, (ValueError, TypeError)) else seen)
        seen = seen.__cause__
    return None


def unknown_choices(overrides: list[str], conf_dir: str | os.PathLike) -> list[str]:
    """One line per ``group=name`` override whose config file does not exist, listing the group's choices.

    Hydra itself prints a 13-line error with exit code 1; the entry points call this first. Groups are the folders
    of ``conf_dir`` (``hydra/`` ones excepted: launcher plugins bring their own); sweeps (``a,b``) are split.
    """
    from pathlib import Path

    problems = []
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        group = Path(conf_dir) / key
        if not sep or override.startswith("~") or key.startswith("hydra") or "." in key or not group.is_dir():
            continue
        if any(c in value for c in "()[]{}$*") or not value:
            continue  # sweep functions, interpolations, globs: left to Hydra
        choices = sorted(p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml"))
        for name in value.split(","):
            if name.strip() not in (*choices, "null"):
                problems.append(f"{key}={name.strip()}: no such config; choices: {', '.join(choices)}")
    return problems


def exit_on_unknown_choice(conf_dir: str | os.PathLike, argv: list[str] | None = None) -> None:
    """``vlmad: error: method=winclp: no such config; choices: ...`` and exit code 2 (before Hydra composes)."""
    problems = unknown_choices(sys.argv[1:] if argv is None else argv, conf_dir)
    if problems:
        for line in problems:
            print(f"vlmad: error: {line}", file=sys.stderr)
        sys.exit(2)


def one_line(err: BaseException, limit: int = 2000) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters."""
    text = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_user_error(fn: F) -> F:
    """Decorator for a ``@hydra.main`` task (place it below): a user error prints ``vlmad: error: ...`` and exits 2.

    Other errors, and every error of a multirun job, propagate to Hydra unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            cause = user_error(err)
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then prints the whole traceback
                raise
            if cause is None or in_multirun():
                raise  # a sweep job fails on its own (run.json says why); the other jobs go on
            print(f"vlmad: error: {one_line(cause)}", file=sys.stderr)
            print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
