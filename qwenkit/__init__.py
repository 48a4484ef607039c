"""qwenkit: run, serve and fine-tune open-weight Qwen models on small machines.

The public API is imported lazily, so that light commands (`qwenkit list`, `qwenkit pull`) and the error types do
not pay for importing torch.
"""

from typing import TYPE_CHECKING

from qwenkit.errors import QwenkitError

__all__ = ["Model", "QwenkitError", "Response", "Usage", "load"]
__version__ = "0.1.0"

_LAZY = {"Model": "qwenkit.runtime", "load": "qwenkit.runtime", "Response": "qwenkit.engine.response",
         "Usage": "qwenkit.engine.response"}

if TYPE_CHECKING:
    from qwenkit.engine.response import Response, Usage
    from qwenkit.runtime import Model, load


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwenkit' has no attribute {name!r}")
