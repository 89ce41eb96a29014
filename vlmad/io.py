"""Atomic file writes: a reader (or a killed run) never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], None]


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path``, unique per process and thread, never ending in ``path``'s suffix."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer, encoding: str = "utf-8") -> Path:
    """Write ``data`` to a temporary sibling, then ``os.replace`` it onto ``path`` (parents created).

    Args:
        path: destination file.
        data: bytes, text (encoded with ``encoding``) or a function writing into the open binary file
            (e.g. ``lambda f: torch.save(obj, f)``).
        encoding: text encoding.

    Returns:
        ``path`` as a Path. On any error the temporary file is removed and the error re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with tmp.open("wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode(encoding) if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (non-JSON values via ``str``), ending in a newline."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")
