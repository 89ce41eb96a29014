"""Expected user errors: one clear line and a non-zero exit instead of a traceback (``VLMAD_DEBUG=1`` shows it)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
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
        if isinstance(seen, InstantiationException):
            # a constructor rejected a configured value (ValueError/TypeError): a config error
            cause = seen.__cause__
            return user_error(cause) or (cause if isinstance(cause, (ValueError, TypeError)) else seen)
        seen = seen.__cause__
    return None


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
