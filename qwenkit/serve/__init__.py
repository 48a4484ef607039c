"""The OpenAI-compatible server (`qwenkit serve`): protocol in, engine out.

    from qwenkit.serve import ServeConfig, serve
    serve(ServeConfig("qwen2.5-coder:0.5b", port=8000))

Layout: protocol.py (request models), app.py (routes, auth, errors, SSE), chat.py / completions.py (requests to
engine jobs and back), generation.py (running a job's sequences), metrics.py, service.py (the model in the
background), server.py (uvicorn, SIGTERM drain).
"""

from qwenkit._lazy import lazy_exports
from qwenkit.serve.service import ModelService, ServeConfig

__all__ = ["ModelService", "ServeConfig", "create_app", "serve"]

# FastAPI and uvicorn are imported only by the modules that need them.
__getattr__ = lazy_exports("qwenkit.serve", {"create_app": "qwenkit.serve.app", "serve": "qwenkit.serve.server"})
