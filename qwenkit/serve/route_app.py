"""`qwenkit serve --route route.yaml`: the same OpenAI chat API, answered by a Router (qwenkit.route) rather than
one model. Backends are tried in order with failover, also in the middle of a stream.

The `x-qwenkit-backends` header names the backend that started the answer (headers leave before a later switch can
happen); the last chunk's (or the whole response's) `qwenkit_backends` field names every backend that served it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qwenkit.route.backends import BackendRejected
from qwenkit.route.router import AllBackendsFailed, Router
from qwenkit.serve.app import Guard, SSEResponse, add_error_handlers, error_response, read_body, sse
from qwenkit.serve.errors import APIError

log = logging.getLogger("qwenkit.serve")

BACKENDS_HEADER = "x-qwenkit-backends"


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return error_response(APIError(status, message, kind, None, code))


def create_route_app(router: Router, api_key: str | None = None, max_body_bytes: int = 4 << 20) -> Starlette:
    """Plain Starlette, not FastAPI: nothing here uses FastAPI's models or docs, and its per-request machinery
    (dependency solving, its middlewares) was about 0.15 ms of the router's overhead on every request."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.close()

    async def health(request: Request) -> JSONResponse:
        usable = [b.name for b in router.backends if b.ready and b.breaker.state != "open"]
        states = {b.name: b.breaker.state if b.ready else "not ready" for b in router.backends}
        return JSONResponse({"status": "ready" if usable else "unavailable", "backends": states},
                            status_code=200 if usable else 503)

    async def models(request: Request) -> JSONResponse:
        served = router.config.served_model_name
        models = {served: {"id": served, "object": "model", "owned_by": "qwenkit"}}
        for b in router.config.backends:
            for name in b.aliases:
                models.setdefault(name, {"id": name, "object": "model", "owned_by": "qwenkit"})
            for name in b.lora:  # a native backend's adapters, chosen by name as `qwenkit serve` lists them
                models.setdefault(name, {"id": name, "object": "model", "owned_by": "qwenkit", "parent": served})
        return JSONResponse({"object": "list", "data": list(models.values())})

    async def chat(request: Request) -> Response:
        try:
            raw = await read_body(request, max_body_bytes)
        except APIError as e:
            return error_response(e)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "request body must be a JSON object with 'messages'", code="missing_parameter")
        if body.get("model") is not None and not isinstance(body["model"], str):
            return _error(400, f"'model' must be a string, not {type(body['model']).__name__}", code="invalid_type")
        try:
            if not body.get("stream"):
                result, served = await router.complete(body)
                return JSONResponse(result, headers={BACKENDS_HEADER: ",".join(served)})
            stream = router.stream(body)
            it = stream.__aiter__()
            first = await it.__anext__()  # before the status line: a request no backend takes is a clean error
        except BackendRejected as e:
            return JSONResponse(e.body, status_code=e.status)
        except AllBackendsFailed as e:
            return _error(503, str(e), "service_unavailable", "no_backend_available")

        async def events() -> AsyncIterator[bytes]:
            try:
                yield sse(first)
                async for chunk in it:
                    yield sse(chunk)
            except (AllBackendsFailed, BackendRejected) as e:  # mid-stream: the error is an event
                message: Any = e.body if isinstance(e, BackendRejected) else {"error": {
                    "message": str(e), "type": "service_unavailable", "param": None, "code": "no_backend_available"}}
                yield sse(message)
            finally:
                await stream.aclose()
            yield sse("[DONE]")

        # SSEResponse closes the generator (and so the backend stream) whichever way the client goes away.
        return SSEResponse(events(), on_close=lambda: None,
                           headers={"Cache-Control": "no-cache", BACKENDS_HEADER: ",".join(stream.backends)})

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/chat/completions", chat, methods=["POST"])],
                    middleware=[Middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)],  # as serve
                    lifespan=lifespan)
    app.state.router = router
    add_error_handlers(app)
    return app


def serve_route(path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                verbose: int = 0) -> int:
    """Run the router's HTTP server until SIGTERM / Ctrl-C."""
    import sys

    import uvicorn

    from qwenkit.route.config import load_route
    from qwenkit.serve.server import _bind

    router = Router(load_route(path))  # a bad file fails here, before listening
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    app = create_route_app(router, api_key=api_key)
    config = uvicorn.Config(app, log_config=None, access_log=verbose > 0, lifespan="on", timeout_keep_alive=30)
    names = ", ".join(f"{b.name} ({b.type})" for b in router.config.backends)
    print(f"qwenkit serve: routing on http://{bound_host}:{bound_port} to {names}", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
