"""Lazy exports: a package names what it offers, and the module holding each name is imported on first use, so that
light commands and error types do not pay for torch, FastAPI or uvicorn."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ resolving each name in `where` (name -> module path) on first access."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
