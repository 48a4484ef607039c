"""The model the assistant talks to: a qwenkit.Client over one model in this process, one OpenAI-compatible server,
or a route file (hosted first, on-device fallback, with failover even mid-answer)."""

from __future__ import annotations

from qwenkit.errors import BadConfig, QwenkitError
from qwenkit.route.client import Client
from qwenkit.route.config import BackendConfig, RouteConfig


def open_chat(model: str | None = None, *, route: str | None = None, base_url: str | None = None,
              api_key: str | None = None, threads: int | None = None, quant: str = "auto",
              load_timeout: float = 600.0) -> Client:
    """A started Client; a model in this process is loaded before this returns (its load error is raised here).
    With base_url, `model` is the name that server knows its model by (optional)."""
    if route is not None and (model is not None or base_url is not None):
        raise BadConfig("--route names the models itself: give no model and no --base-url with it")
    if route is None and base_url is None and model is None:
        raise BadConfig("give a model (a short name, hub id or path), --route or --base-url")
    if route is not None:
        client = Client(route)
    elif base_url is not None:
        client = Client(RouteConfig(backends=[BackendConfig(
            name="remote", type="openai", base_url=base_url.rstrip("/").removesuffix("/v1"), api_key=api_key,
            model=model, first_token_timeout=120.0, inter_token_timeout=60.0)]))
    else:
        client = Client(RouteConfig(backends=[BackendConfig(name="device", type="native", model=model,
                                                            threads=threads, quant=quant, max_batch=4)]))
    for backend in client.router.backends:
        if not backend.remote and not backend.wait_loaded(load_timeout):
            error = getattr(getattr(backend, "service", None), "error", None)
            client.close()
            if isinstance(error, QwenkitError):
                raise error
            raise QwenkitError(f"the model of backend '{backend.name}' did not load: {error}")
    return client

