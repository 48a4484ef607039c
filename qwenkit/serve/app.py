"""The OpenAI-compatible HTTP API, as a FastAPI app around a ModelService.

    app = create_app(service)       # service: qwenkit.serve.service.ModelService (loading or loaded)

Request bodies are read and validated here, not by FastAPI, so that every failure (malformed JSON, a wrong type,
an unknown field, a body over the size cap) becomes one OpenAI error body naming the field. Generation runs on
the engine; streaming responses are Server-Sent Events whose generator is always closed when the client goes
away, which aborts the engine requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenkit.engine.response import Response as EngineResponse
from qwenkit.errors import QwenkitError
from qwenkit.serve import protocol
from qwenkit.serve.chat import build_chat_job
from qwenkit.serve.completions import build_completion_job
from qwenkit.serve.errors import APIError, from_qwenkit, from_validation
from qwenkit.serve.format import Job, total_usage
from qwenkit.serve.generation import Run, job_chunks
from qwenkit.serve.metrics import CONTENT_TYPE, Metrics
from qwenkit.serve.service import FAILED, LOADING, ModelService

log = logging.getLogger("qwenkit.serve")

PUBLIC_PATHS = frozenset({"/health"})
KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                         "/detokenize"})


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Guard:
    """Pure ASGI middleware (streaming-safe, unlike BaseHTTPMiddleware): API key, declared body size, and (given
    metrics) the per-path request counter. Bodies sent without a Content-Length are capped while they are read
    (read_body)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = 500

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            rejection = self._check(scope)
            if rejection is not None:
                await error_response(rejection)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            if self.metrics is not None:
                self.metrics.http.labels(path if path in KNOWN_PATHS else "other", str(status)).inc()

    def _check(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in PUBLIC_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            # compare_digest on every request, present or not: no timing difference to learn the key from
            ok = hmac.compare_digest(given.strip(), self.key) and scheme.lower() == b"bearer"
            if not ok:
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                "invalid_request_error", None, "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return too_large(self.max_body)
        return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (Guard refuses a declared Content-Length
    over it; this catches bodies sent without one)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator and calls `on_close`, whichever way streaming ends: a
    send that fails on a closed socket would otherwise leave the generator suspended (and its engine requests
    running) until garbage collection, and a generator that never started has no `finally` to run at all."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def add_error_handlers(app: Starlette) -> None:
    """Every error as an OpenAI-style JSON body: ours, routing's 404/405, and a bug's 500 (logged, never shown)."""

    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    async def on_qwenkit_error(request: Request, e: QwenkitError) -> JSONResponse:
        return error_response(from_qwenkit(e))

    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(APIError(e.status_code, message, kind, None, None, dict(e.headers or {}) or None))

    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error", "server_error", None, "internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(QwenkitError, on_qwenkit_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)


def create_app(service: ModelService, metrics: Metrics | None = None) -> FastAPI:
    config = service.config
    metrics = metrics or Metrics(service.stats)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and waited for open connections: finish what the engine still holds.
        await anyio.to_thread.run_sync(service.shutdown)

    app = FastAPI(title="qwenkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.metrics = service, metrics
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, metrics=metrics)

    add_error_handlers(app)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def require_ready() -> None:
        if service.state == LOADING:
            raise APIError(503, "the model is still loading; retry shortly", "service_unavailable", None,
                           "model_loading", {"Retry-After": "5"})
        if service.state == FAILED:
            raise APIError(503, f"the model failed to load: {service.error}", "service_unavailable", None,
                           "model_load_failed")
        if not service.ready:
            raise APIError(503, "the server is shutting down", "service_unavailable", None, "server_shutting_down")

    def check_model(name: str | None) -> None:
        if name is not None and name not in service.model_names():
            served = "', '".join(service.model_names())
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{served}'",
                           "not_found_error", "model", "model_not_found")

    async def read(request: Request, model: type[BaseModel], raw: bytes | None = None) -> Any:
        raw = await read_body(request, config.max_body_bytes) if raw is None else raw
        try:
            parsed = model.model_validate_json(raw)
        except ValidationError as e:
            raise from_validation(e) from None
        check_model(getattr(parsed, "model", None))
        return parsed

    async def generate(request: Request, build: Callable[..., Job], body: BaseModel) -> Response:
        started = time.monotonic()
        require_ready()
        # Rendering, tokenizing and compiling a grammar are CPU work: keep them off the event loop.
        job = await anyio.to_thread.run_sync(build, service, body, config.request_timeout)
        run = Run(service.engine, job.requests, metrics, started)
        try:
            run.submit()  # a full queue raises here, before any byte is sent: a clean 429
        except QwenkitError as e:
            raise from_qwenkit(e) from None
        if job.stream:
            return SSEResponse(stream_events(job, run), on_close=run.abort, headers={"Cache-Control": "no-cache"})
        return await collect(request, job, run)

    # ---- endpoints -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": service.state}, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        require_ready()
        base = {"id": config.name, "object": "model", "created": service.created, "owned_by": "qwenkit",
                "root": config.model, "parent": None, "max_model_len": service.model.context_length,
                "input_modalities": ["text", "image"] if service.model.takes_images else ["text"]}
        adapters = [{**base, "id": name, "root": str(folder), "parent": config.name}
                    for name, folder in config.lora.items()]
        return JSONResponse({"object": "list", "data": [base, *adapters]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, build_chat_job, await read(request, protocol.ChatCompletionRequest))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, build_completion_job, await read(request, protocol.CompletionRequest))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        data = await read_any(request, (protocol.TokenizeChat, protocol.TokenizeCompletion))
        require_ready()
        model = service.model

        def work() -> list[int]:
            if isinstance(data, protocol.TokenizeChat):
                thinking = data.chat_template_kwargs.enable_thinking if data.chat_template_kwargs else None
                tools = [t.model_dump(exclude_none=True) for t in data.tools] if data.tools else None
                text = model.template.render([m.to_template() for m in data.messages], tools=tools,
                                             add_generation_prompt=data.add_generation_prompt,
                                             continue_final_message=data.continue_final_message,
                                             enable_thinking=thinking)
                return model.tokenizer.encode(text)
            return model.tokenizer.encode(data.prompt)

        tokens = await anyio.to_thread.run_sync(work)
        out: dict[str, Any] = {"count": len(tokens), "max_model_len": model.context_length, "tokens": tokens,
                               "token_strs": None}
        if data.return_token_strs:
            out["token_strs"] = [model.tokenizer.id_to_token(t) for t in tokens]
        return JSONResponse(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        data = await read(request, protocol.DetokenizeRequest)
        require_ready()
        tokenizer = service.model.tokenizer
        bad = [t for t in data.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens: {bad[0]} is not a token id of this model", param="tokens",
                           code="invalid_value")
        return JSONResponse({"prompt": tokenizer.decode(data.tokens)})

    async def read_any(request: Request, models: tuple[type[BaseModel], ...]) -> Any:
        """/tokenize takes either shape: messages (chat) or prompt (completion), told apart by the field."""
        raw = await read_body(request, config.max_body_bytes)
        try:
            shape = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            shape = None  # the chosen model's validation reports it
        return await read(request, models[0] if isinstance(shape, dict) and "messages" in shape else models[1], raw)

    # ---- streaming and collecting ------------------------------------------------------------------------------
    async def stream_events(job: Job, run: Run) -> AsyncIterator[bytes]:
        chunks = job_chunks(job, run)
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except QwenkitError as e:  # mid-stream: the status line is long gone, so the error is an event
            yield sse(from_qwenkit(e).body())
        except Exception:  # noqa: BLE001 - a bug must end this stream, not the server
            log.exception("error while streaming")
            yield sse(APIError(500, "internal server error", "server_error", None, "internal_error").body())
        finally:
            run.abort()
            await chunks.aclose()
        yield sse("[DONE]")

    async def collect(request: Request, job: Job, run: Run) -> Response:
        totals = [EngineResponse() for _ in job.requests]

        async def gather() -> None:
            async for i, step in run.steps():
                totals[i].merge(step)

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left (or we were cancelled): stop generating for nobody
                work.cancel()
                run.abort()
        if not work.done() or work.cancelled():
            return Response(status_code=499)  # nobody is listening; the status only shows in the access log
        try:
            work.result()
        except QwenkitError as e:
            raise from_qwenkit(e) from None
        usage = total_usage(job.prompt_tokens, [t.usage for t in totals])
        return JSONResponse(job.formatter.final(totals, usage))

    return app


async def wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the client closes the connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
