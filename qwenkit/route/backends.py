"""The router's backends: each streams OpenAI chat.completion.chunk dicts for a chat request.

- OpenAIBackend: any OpenAI-compatible server over HTTP (qwenkit serve, vLLM, llama.cpp's server, a cloud API).
- NativeBackend: a model in this process, through the same code path as `qwenkit serve` (request validation,
  chat job, engine with continuous batching), so the on-device fallback answers exactly as a qwenkit server would.

Failures the router may fail over from raise BackendError; a request the backend refuses as invalid (a 4xx other
than 408/429) raises BackendRejected, which goes back to the client: another backend would refuse it too.
Timeouts between chunks are the router's job (one policy for every kind of backend), not the backends'.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from qwenkit.route.breaker import Breaker
from qwenkit.route.config import BackendConfig

log = logging.getLogger("qwenkit.route")

RETRYABLE_STATUS = frozenset({408, 429})  # plus every 5xx


class BackendError(Exception):
    """A failure worth trying elsewhere: refused connection, timeout, 5xx, 429, a stream cut short."""

    def __init__(self, backend: str, message: str, status: int | None = None):
        super().__init__(f"{backend}: {message}")
        self.backend, self.status = backend, status


class BackendRejected(Exception):
    """The backend refused the request itself (400, 401, 404...): its error body goes back to the client."""

    def __init__(self, backend: str, status: int, body: dict):
        super().__init__(f"{backend}: HTTP {status}: {body}")
        self.backend, self.status, self.body = backend, status, body


class Backend:
    """Interface: `stream` chunks, `probe` health cheaply, `start`/`close` resources."""

    remote = True

    def __init__(self, config: BackendConfig):
        self.config = config
        self.name = config.name
        self.breaker = Breaker(config.breaker.failures, config.breaker.cooldown)
        self.latency: float | None = None  # moving average of the time to first token, seconds

    def observe_latency(self, seconds: float) -> None:
        """Time to first token of a served request, for the latency-aware choice among equal-priority backends."""
        self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds

    @property
    def ready(self) -> bool:
        """Able to take requests as far as this process knows (a remote one: its breaker decides)."""
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def probe(self) -> bool:
        raise NotImplementedError

    def working(self) -> bool:
        """Still computing this process's requests, known without a chunk (a model prefilling a long prompt).
        Only an in-process model can tell; the router waits for the last backend left while it is."""
        return False

    def token_counter(self) -> Callable[[str], int] | None:
        """Counts the tokens of a text with this backend's own tokenizer, when it has one in this process (the
        router uses it to charge a partial answer against max_tokens before a continuation)."""
        return None

    def stream(self, body: dict[str, Any]) -> AsyncIterator[dict]:
        raise NotImplementedError


class OpenAIBackend(Backend):
    """Over aiohttp: its C HTTP parser and lean request path took about 0.7 ms less per streamed request than httpx
    on the development machine, and this path is the router's whole overhead when the host is healthy."""

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self._session = None

    def _http(self):
        if self._session is None:
            import aiohttp

            # Read timeouts are the router's first-token / inter-token deadlines; only connecting is bounded here.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, trust_env=True)  # proxies from the environment
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe(self) -> bool:
        """GET /health (qwenkit, vLLM, llama.cpp), else /v1/models (cloud APIs): neither is a billed completion."""
        import aiohttp

        limit = aiohttp.ClientTimeout(total=max(self.config.connect_timeout, 0.1) * 2)
        try:
            for path in ("/health", "/v1/models"):
                async with self._http().get(f"{self.config.base_url}{path}", headers=self._headers(),
                                            timeout=limit) as r:
                    await r.read()
                    if r.status != 404:
                        return r.status == 200
            return False
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict]:
        import aiohttp

        url = f"{self.config.base_url}/v1/chat/completions"
        done = False
        try:
            async with self._http().post(url, json=body, headers=self._headers()) as r:
                if r.status != 200:
                    raw = await r.read()
                    if r.status >= 500 or r.status in RETRYABLE_STATUS:
                        raise BackendError(self.name, f"HTTP {r.status}", r.status)
                    try:
                        err = json.loads(raw)
                    except ValueError:
                        err = {"error": {"message": raw.decode(errors="replace")[:500], "type": "backend_error"}}
                    raise BackendRejected(self.name, r.status, err)
                async for line in _lines(r.content, self.name):
                    # After [DONE], the body is read on to its end (it ends at once) rather than left: a response
                    # closed half-read takes its connection with it, and a new TCP connection per request cost
                    # the healthy path about a millisecond.
                    if done or not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise BackendError(self.name, f"not a JSON event: {data[:200]!r}") from None
                    if "error" in chunk:  # an error event after the status line: the stream failed there
                        raise BackendError(self.name, f"error event: {chunk['error']}")
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as e:
            raise BackendError(self.name, f"{type(e).__name__}: {e}") from None
        if not done:
            raise BackendError(self.name, "the stream ended before [DONE]")


MAX_LINE = 16 << 20  # a server that never ends its line would otherwise fill the memory


async def _lines(content, backend: str) -> AsyncIterator[bytes]:
    """The lines of a streamed body, up to MAX_LINE bytes each (aiohttp's own line reader stops at its buffer
    size, 64 KiB, which one chunk with many top_logprobs can pass)."""
    pending = bytearray()
    async for data in content.iter_any():
        pending += data
        if b"\n" in data:  # only then split: a long line is not rescanned (or recopied) with every piece
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield bytes(line).rstrip(b"\r")
        if len(pending) > MAX_LINE:
            raise BackendError(backend, f"a line of the stream is over {MAX_LINE >> 20} MiB")
    if pending:
        yield bytes(pending)


class NativeBackend(Backend):
    """A model loaded in this process, served by qwenkit.serve's ModelService and chat job code."""

    remote = False

    def __init__(self, config: BackendConfig, loader: Callable[[], object] | None = None):
        super().__init__(config)
        self._loading = False
        self._streams = 0  # requests in flight here (from validation to their last chunk)
        from qwenkit.serve.metrics import Metrics
        from qwenkit.serve.service import ModelService, ServeConfig

        serve_config = ServeConfig(model=config.model, served_model_name=config.name, quant=config.quant,
                                   threads=config.threads, max_model_len=config.max_model_len,
                                   max_batch=config.max_batch, lora=dict(config.lora), draft=config.draft,
                                   draft_tokens=config.draft_tokens, lookup=config.lookup)
        self.service = ModelService(serve_config, loader=loader)
        self.metrics = Metrics(self.service.stats)

    async def start(self) -> None:
        if not self._loading:
            self._loading = True
            self.service.start_loading()

    async def close(self) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.service.shutdown)

    @property
    def ready(self) -> bool:
        return self.service.ready

    async def probe(self) -> bool:
        return self.service.ready

    def working(self) -> bool:
        from qwenkit.serve.service import LOADING

        engine = self.service.engine
        return self.service.state == LOADING or (self._streams > 0 and engine is not None and engine.running)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self.service.wait_loaded(timeout)

    def token_counter(self) -> Callable[[str], int] | None:
        if not self.service.ready:
            return None
        tokenizer = self.service.model.tokenizer
        return lambda text: len(tokenizer.encode(text)) if text else 0

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict]:
        self._streams += 1
        try:
            async for chunk in self._stream(body):
                yield chunk
        finally:
            self._streams -= 1

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[dict]:
        import anyio
        from pydantic import ValidationError

        from qwenkit.errors import EngineStopped, Overloaded, QwenkitError
        from qwenkit.serve.chat import build_chat_job
        from qwenkit.serve.errors import from_qwenkit, from_validation
        from qwenkit.serve.generation import Run, job_chunks
        from qwenkit.serve.protocol import ChatCompletionRequest
        from qwenkit.serve.service import LOADING

        while self.service.state == LOADING:  # the fallback is about to exist: worth waiting for (the router's
            await asyncio.sleep(0.05)  # first-token deadline bounds the wait, unless nothing comes after it)
        if not self.service.ready:
            raise BackendError(self.name, f"the model is {self.service.state}")
        # The one model here answers any name; a name of one of its adapters chooses that adapter.
        body = {k: v for k, v in body.items() if k != "model" or v in self.config.lora}
        if self.config.images == "drop" and not self.service.model.takes_images:
            body = _without_images(body)
        try:
            # Through JSON, as the server reads it: strict validation then treats the dict exactly like a body.
            req = ChatCompletionRequest.model_validate_json(json.dumps(body))
        except ValidationError as e:
            err = from_validation(e)
            raise BackendRejected(self.name, err.status, err.body()) from None
        try:
            job = await anyio.to_thread.run_sync(build_chat_job, self.service, req, self.service.config.request_timeout)
            run = Run(self.service.engine, job.requests, self.metrics)
            run.submit()
        except (Overloaded, EngineStopped) as e:
            raise BackendError(self.name, str(e)) from None
        except QwenkitError as e:
            err = from_qwenkit(e)
            raise BackendRejected(self.name, err.status, err.body()) from None
        chunks = job_chunks(job, run)
        try:
            async for chunk in chunks:
                yield chunk
        except QwenkitError as e:
            raise BackendError(self.name, str(e)) from None
        finally:
            run.abort()
            await chunks.aclose()


def _without_images(body: dict[str, Any]) -> dict[str, Any]:
    """The request with its image parts left out (route.yaml `images: drop`, for a text-only on-device model)."""
    from qwenkit.text.chat import IMAGE_PART_TYPES

    def text_only(message: Any) -> Any:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            return message
        return {**message, "content": [p for p in content
                                       if not (isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)]}

    messages = body.get("messages")
    return {**body, "messages": [text_only(m) for m in messages]} if isinstance(messages, list) else body


def make_backend(config: BackendConfig) -> Backend:
    return NativeBackend(config) if config.type == "native" else OpenAIBackend(config)
