"""qwenkit: run, serve and fine-tune open-weight Qwen models on small machines."""

from qwenkit.engine.response import Response, Usage
from qwenkit.errors import QwenkitError
from qwenkit.runtime import Model, load

__all__ = ["Model", "QwenkitError", "Response", "Usage", "load"]
__version__ = "0.1.0"
