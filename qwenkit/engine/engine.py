"""The serving engine: many requests share one model, and each gets its own stream of Responses.

    engine = Engine(model, tokenizer, max_batch=8, max_queue=64)
    engine.start()
    stream = engine.submit(GenerationRequest(prompt_ids, params, max_new_tokens=64, stop_ids={151645}))
    for step in stream:            # or `async for step in stream` inside an event loop
        ...                        # one Response per generated token; the last has finish_reason and usage
    stream.abort()                 # a client went away: the request leaves the batch and frees its blocks

A worker thread runs the scheduler (qwenkit.engine.scheduler): requests join and leave the running batch at every
step, prompts are prefilled in chunks between decode steps, and the KV cache is a pool of blocks shared through
the prefix cache (qwenkit.engine.paged). With an AdapterSet (qwenkit.engine.adapters), each request may name a
LoRA adapter (`GenerationRequest.adapter`); requests of different adapters share every step. With a Speculation
(qwenkit.engine.speculative: a draft model, prompt lookup), decoding requests guess tokens that the model checks.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qwenkit.engine.response import Response
from qwenkit.engine.sampling import SamplingParams
from qwenkit.engine.scheduler import EngineStats, Scheduler
from qwenkit.errors import BadRequest, EngineStopped, Overloaded, QwenkitError
from qwenkit.quant.linear import batch_invariant
from qwenkit.quant.plan import default_kv_dtype

if TYPE_CHECKING:
    from qwenkit.engine.adapters import AdapterSet
    from qwenkit.engine.speculative import Speculation


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: set[int] = field(default_factory=set)
    parser: object | None = None  # a text.stream.StreamParser for chat output (reasoning / content / tool calls)
    constraint: object | None = None  # a grammar.Constraint: only tokens it allows are sampled
    timeout: float | None = None  # seconds from submission; past it the stream raises RequestTimeout
    adapter: int = 0  # a LoRA adapter of the engine's AdapterSet (qwenkit.engine.adapters); 0 = the base model
    images: list = field(default_factory=list)  # multimodal.ImageInput of the prompt's image runs, in order


_DONE = object()


class RequestStream:
    """The Responses of one request, readable from a thread (iteration) or from asyncio (async iteration)."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, engine: Engine, asynchronous: bool | None = None):
        self.id = next(self._ids)
        self.request = request
        self.submitted = time.monotonic()
        self.deadline = self.submitted + request.timeout if request.timeout else None
        self.aborted = False
        self._engine = engine
        try:  # read with `async for` when submitted from an event loop, unless the caller says otherwise
            loop = asyncio.get_running_loop() if asynchronous is not False else None
        except RuntimeError:
            loop = None
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    # ---- called by the worker thread ----------------------------------------------------------------------------
    def put(self, item: Response | QwenkitError | object) -> None:
        if self._loop is None:
            self._queue.put(item)
        else:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.aborted = True

    def close(self) -> None:
        """The last Response was put: iteration ends after it."""
        self.put(_DONE)

    # ---- called by the consumer ---------------------------------------------------------------------------------
    def abort(self) -> None:
        """Stop generating for this request; its blocks are freed at the engine's next step."""
        if not self.aborted:
            self.aborted = True
            self._engine._wake()

    def __iter__(self) -> Iterator[Response]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, QwenkitError):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[Response]:
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, QwenkitError):
                    raise item
                yield item
        finally:  # the consumer stopped early (client disconnect, cancelled task): free the request's blocks
            self.abort()


PREFILL_CHUNK = 512  # rows per step: bounds a long prompt's activation memory and how long it holds up decoding
KV_DTYPES = {"f16": torch.float16, "f32": torch.float32}


def kv_dtype(name: str | None) -> torch.dtype | None:
    """The KV dtype a flag names (f16, f32); None for the engine's default."""
    if name is None:
        return None
    if name not in KV_DTYPES:
        raise BadRequest(f"kv dtype must be one of {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


_running: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_running_engines() -> None:
    """At interpreter exit, stop every worker before the runtime tears down under it (a worker still inside
    PyTorch then aborts the process: "terminate called without an active exception")."""
    for engine in list(_running):
        engine.shutdown(drain=False)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_blocks: int | None = None,
        prefill_chunk: int | None = None,
        kv_dtype: torch.dtype | None = None,
        adapters: AdapterSet | None = None,
        speculation: Speculation | None = None,
    ):
        prefill_chunk = prefill_chunk or PREFILL_CHUNK  # rows per step (decode + prompt), see Scheduler._plan
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.max_queue = max_queue
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.scheduler = Scheduler(
            model, tokenizer, max_batch=max_batch, max_model_len=self.max_model_len, block_size=block_size,
            kv_blocks=kv_blocks, prefill_chunk=prefill_chunk, kv_dtype=kv_dtype or default_kv_dtype(model.dtype),
            adapters=adapters, speculation=speculation,
        )
        self._incoming: queue.SimpleQueue[RequestStream] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False  # no new requests
        self._stopped = False  # the worker leaves its loop
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- public --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)
            self._thread.start()
            _running.add(self)

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=False)

    def submit(self, request: GenerationRequest, asynchronous: bool | None = None) -> RequestStream:
        """Queue a request; its stream is read with `async for` when submitted from an event loop, else with `for`
        (asynchronous=False: with `for` even from a loop's thread, as the Python API reads it)."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        known = self.adapters.names.values() if self.adapters is not None else ()
        if request.adapter and request.adapter not in known:  # else the base model would answer, unannounced
            raise BadRequest(f"no adapter with id {request.adapter} is loaded")
        with self._lock:
            # Requests not yet picked up by the worker may still take a free batch slot rather than wait.
            queued = self.scheduler.waiting_count() + self._incoming.qsize() - self.scheduler.free_slots()
            if queued >= self.max_queue:
                raise Overloaded(f"the request queue is full ({self.max_queue} waiting); retry shortly")
        stream = RequestStream(request, self, asynchronous)
        self._incoming.put(stream)
        self._wake()
        return stream

    def stats(self) -> EngineStats:
        return self.scheduler.stats(extra_waiting=self._incoming.qsize())

    @property
    def stopping(self) -> bool:
        """Shut down, or shutting down: it takes no new requests."""
        return self._stopping

    @property
    def idle(self) -> bool:
        return self._incoming.empty() and self.scheduler.idle

    @property
    def running(self) -> bool:
        """Its worker thread is alive and stepping: whatever was submitted is being computed, however slowly."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with drain, let the ones in flight finish (up to timeout seconds), then stop."""
        self._stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and not self.idle and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        self._stopped = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        error = EngineStopped("the server stopped before this request finished")
        while not self._incoming.empty():  # submitted but never picked up by the worker: they must not hang
            self._incoming.get().put(error)
        self.scheduler.fail_all(error)

    # ---- the worker thread ---------------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wakeup.set()

    def step(self) -> None:
        """One step in the calling thread, for an engine whose worker was not started: tools that drive it step by
        step (the CPU benchmark's profile of one decode step)."""
        if self._thread is not None:
            raise RuntimeError("the engine's worker thread is running it")
        with torch.inference_mode(), batch_invariant():
            self._take_incoming()
            self.scheduler.step()

    def _take_incoming(self) -> None:
        while not self._incoming.empty():
            self.scheduler.add(self._incoming.get())

    def _run(self) -> None:
        with torch.inference_mode(), batch_invariant():  # a request's tokens must not depend on its neighbours
            while not self._stopped:
                self._take_incoming()
                if self.scheduler.idle:
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                self.scheduler.step()
