"""PEP 562 lazy exports shared by vlmad's packages: a name is imported from its module on first use."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> module holding it (``"base"`` = ``package.base``; a dotted name is absolute).
    """

    def module_getattr(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name] if "." in exports[name] else f"{package}.{exports[name]}"
        value = getattr(importlib.import_module(module), name)
        sys.modules[package].__dict__[name] = value  # later lookups skip __getattr__
        return value

    def module_dir() -> list[str]:
        return sorted(exports)

    return module_getattr, module_dir
