"""Running a request's sequences (n of them, or one per prompt) on the engine, as one stream of (index, Response).

The engine gives each sequence its own RequestStream; `Run` submits them all (or none: a full queue rejects the
whole request), merges their steps in arrival order, keeps the timing the metrics need, and aborts every sequence
still running when the consumer stops early (client disconnect, error, cancellation).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qwenkit.engine.engine import GenerationRequest
from qwenkit.engine.response import Response
from qwenkit.serve.format import Job, total_usage
from qwenkit.serve.metrics import Metrics


@dataclass
class _Timing:
    first: float | None = None
    last: float = 0.0


@dataclass
class Run:
    engine: object
    requests: list[GenerationRequest]
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)  # when the HTTP request arrived

    def __post_init__(self) -> None:
        self.streams: list = []
        self._timing = [_Timing() for _ in self.requests]

    def submit(self) -> None:
        """Queue every sequence; all or nothing (Overloaded / EngineStopped abort the ones already queued)."""
        try:
            for request in self.requests:
                self.streams.append(self.engine.submit(request))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for stream in self.streams:
            stream.abort()

    async def steps(self) -> AsyncIterator[tuple[int, Response]]:
        """(sequence index, Response) as the engine produces them; raises the first error of any sequence."""
        try:
            if len(self.streams) == 1:
                async for step in self.streams[0]:
                    self._observe(0, step)
                    yield 0, step
                return
            async for i, step in _merge(self.streams):
                self._observe(i, step)
                yield i, step
        finally:
            self.abort()  # a no-op for finished sequences; frees the blocks of any still running

    def _observe(self, i: int, step: Response) -> None:
        now = time.monotonic()
        t = self._timing[i]
        if step.tokens and t.first is None:
            t.first = now
        if step.tokens:
            t.last = now
        if step.finish_reason is not None and step.usage is not None:
            ttft = t.first - self.started if t.first is not None else None
            self.metrics.observe_sequence(ttft, t.first or now, t.last or now, step.usage.prompt_tokens,
                                          step.usage.completion_tokens, step.finish_reason)


async def job_chunks(job: Job, run: Run) -> AsyncIterator[dict]:
    """A submitted job's streaming chunks as OpenAI objects (opening, deltas, usage when asked): what the HTTP
    stream sends as events and what the router's native backend relays."""
    fmt = job.formatter
    finals: list = [None] * len(job.requests)
    for chunk in fmt.opening_chunks():
        yield chunk
    async for i, step in run.steps():
        chunk = fmt.chunk(i, step)
        if chunk is not None:
            yield chunk
        if step.finish_reason is not None:
            finals[i] = step.usage
    if job.include_usage:
        yield fmt.usage_chunk(total_usage(job.prompt_tokens, finals))


async def _merge(streams: list) -> AsyncIterator[tuple[int, Response]]:
    """Interleave several RequestStreams. One pump task per stream feeds a queue; cancelling (or closing) this
    generator cancels the pumps, whose `async for` then aborts its stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream) -> None:
        try:
            async for step in stream:
                queue.put_nowait((i, step))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        # Not awaited: this may run inside a cancelled scope. The caller aborts the streams synchronously anyway.
        for t in tasks:
            t.cancel()
