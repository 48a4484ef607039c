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
LoRA adapter (`GenerationRequest.adapter`); requests of different adapters share every step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qwenkit.engine.response import Response
from qwenkit.engine.sampling import SamplingParams
from qwenkit.errors import BadRequest, EngineStopped, Overloaded, QwenkitError

if TYPE_CHECKING:
    from qwenkit.engine.adapters import AdapterSet


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


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose keys and values were reused
    preemptions: int = 0  # requests sent back to the queue because the block pool ran out


_DONE = object()


class RequestStream:
    """The Responses of one request, readable from a thread (iteration) or from asyncio (async iteration)."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, engine: Engine):
        self.id = next(self._ids)
        self.request = request
        self.submitted = time.monotonic()
        self.deadline = self.submitted + request.timeout if request.timeout else None
        self.aborted = False
        self._engine = engine
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue()
        except RuntimeError:
            self._loop, self._queue = None, queue.SimpleQueue()

    # ---- called by the worker thread ----------------------------------------------------------------------------
    def put(self, item: Response | QwenkitError | object) -> None:
        if self._loop is None:
            self._queue.put(item)
        else:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.aborted = True

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
        adapters: AdapterSet | None = None,
    ):
        from qwenkit.engine.scheduler import Scheduler
        from qwenkit.quant.linear import FUSED_MAX_ROWS

        prefill_chunk = prefill_chunk or FUSED_MAX_ROWS  # rows per step (decode + prompt), see Scheduler._plan

        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.scheduler = Scheduler(
            model, tokenizer, max_batch=max_batch, max_model_len=self.max_model_len, block_size=block_size,
            kv_blocks=kv_blocks, prefill_chunk=prefill_chunk, adapters=adapters,
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

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=False)

    def submit(self, request: GenerationRequest) -> RequestStream:
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        known = self.scheduler.adapters.names.values() if self.scheduler.adapters is not None else ()
        if request.adapter and request.adapter not in known:  # else the base model would answer, unannounced
            raise BadRequest(f"no adapter with id {request.adapter} is loaded")
        with self._lock:
            # Requests not yet picked up by the worker may still take a free batch slot rather than wait.
            queued = self.scheduler.waiting_count() + self._incoming.qsize() - self.scheduler.free_slots()
            if queued >= self.max_queue:
                raise Overloaded(f"the request queue is full ({self.max_queue} waiting); retry shortly")
        stream = RequestStream(request, self)
        self._incoming.put(stream)
        self._wake()
        return stream

    def stats(self) -> EngineStats:
        return self.scheduler.stats(extra_waiting=self._incoming.qsize())

    @property
    def idle(self) -> bool:
        return self._incoming.empty() and self.scheduler.idle

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

    def _run(self) -> None:
        import torch

        from qwenkit.quant.linear import batch_invariant

        with torch.inference_mode(), batch_invariant():  # a request's tokens must not depend on its neighbours
            while not self._stopped:
                while not self._incoming.empty():
                    self.scheduler.add(self._incoming.get())
                if self.scheduler.idle:
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                self.scheduler.step()
