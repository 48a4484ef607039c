"""qwenkit: run, serve and fine-tune open-weight Qwen models on small machines.

The public API is imported lazily, so that light commands (`qwenkit list`, `qwenkit pull`) and the error types do
not pay for importing torch.
"""

from typing import TYPE_CHECKING

from qwenkit._lazy import lazy_exports
from qwenkit.errors import QwenkitError

__all__ = ["Client", "Model", "QwenkitError", "Response", "Usage", "load"]
__version__ = "0.1.0"

__getattr__ = lazy_exports("qwenkit", {
    "Client": "qwenkit.route.client", "Model": "qwenkit.runtime", "load": "qwenkit.runtime",
    "Response": "qwenkit.engine.response", "Usage": "qwenkit.engine.response",
})

if TYPE_CHECKING:
    from qwenkit.engine.response import Response, Usage
    from qwenkit.route.client import Client
    from qwenkit.runtime import Model, load

