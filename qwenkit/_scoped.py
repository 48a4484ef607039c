"""A per-thread setting for the duration of a `with` block (the serving engine's modes for the layers it runs)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def scoped(local: threading.local, name: str, value: Any, default: Any = None) -> Iterator[None]:
    """`local.<name>` is `value` inside the block, in this thread; what it was (or `default`) after."""
    previous = getattr(local, name, default)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)
