"""The generation loop for one request: chunked prefill into a preallocated KV cache, then one token per step.

`decode_tokens` yields token ids; `stream_responses` turns them into Responses (incremental UTF-8-safe text, stop
strings, and, for chat, the reasoning / content / tool-call split).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from qwenkit.engine.cache import KVCache
from qwenkit.engine.response import Response, ToolCallFailure, ToolCallRecord, Usage
from qwenkit.engine.sampling import Sampler, SamplingParams, TokenLogprob
from qwenkit.engine.stopstrings import StopStringFilter
from qwenkit.memory import peak_rss_bytes

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory for long prompts


@dataclass
class Timings:
    started: float = 0.0
    prefill_done: float = 0.0
    last_token: float = 0.0


def peak_memory_gb() -> float:
    return peak_rss_bytes() / 2**30


def decode_tokens(
    model, prompt_ids: list[int], sampler: Sampler, max_new: int, stop_ids: set[int], timings: Timings
) -> Iterator[tuple[int, TokenLogprob | None]]:
    """Yield (token, logprob) until a stop id (yielded, then the loop ends) or max_new tokens."""
    dtype = model.dtype
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new, dtype)
    timings.started = time.perf_counter()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(prompt_ids), PREFILL_CHUNK):
            logits = model(ids[:, start : start + PREFILL_CHUNK], cache=cache, logits="last")
    timings.prefill_done = timings.last_token = time.perf_counter()
    for i in range(max_new):
        token, logprob = sampler(logits[0])
        timings.last_token = time.perf_counter()
        yield token, logprob
        if token in stop_ids or i == max_new - 1:  # no forward for a token that will never be sampled
            return
        with torch.inference_mode():
            logits = model(torch.tensor([[token]]), cache=cache, logits="last")


def stream_responses(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    max_new: int,
    stop_ids: set[int],
    parser=None,
    on_token: Callable[[int], None] | None = None,
) -> Iterator[Response]:
    """Generate and yield one Response per token; the last one carries finish_reason, usage and speeds.

    `parser` (a text.stream.StreamParser) splits chat output into reasoning, content and tool calls; without it
    every token is plain text.
    """
    from qwenkit.text.tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    stops = StopStringFilter(params.stop)
    structural = set()
    if parser is not None:
        marks = ("<think>", "</think>", "<tool_call>", "</tool_call>")
        structural = {tokenizer.token_to_id(m) for m in marks} - {None}
    sampler = Sampler(params, model.config.vocab_size, prompt_ids)
    timings = Timings()
    count, finish, saw_calls = 0, "length", False
    for token, logprob in decode_tokens(model, prompt_ids, sampler, max_new, stop_ids, timings):
        count += 1
        if token in stop_ids:
            finish = "stop"
            break
        step = Response(tokens=[token], logprobs=[logprob] if logprob else [])
        delta = decoder.push(token)
        if token in structural:
            _apply(step, parser, stops.flush(), None)  # held text belongs before the structural token
            _apply(step, parser, delta, token)
        else:
            _apply(step, parser, stops.push(delta), None)
        saw_calls |= bool(step.tool_calls)
        if stops.stopped:
            finish = "stop"
            yield step
            break
        yield step
    last = Response()
    if not stops.stopped:
        _apply(last, parser, stops.push(decoder.flush()) + stops.flush(), None)
    if parser is not None:
        _collect(last, parser.finish())
    if finish == "stop" and (saw_calls or last.tool_calls):
        finish = "tool_calls"
    last.finish_reason = finish
    last.usage = Usage(len(prompt_ids), count)
    prefill = max(timings.prefill_done - timings.started, 1e-9)
    last.prompt_tps = len(prompt_ids) / prefill
    last.time_to_first_token = prefill
    if count > 1:
        last.generation_tps = (count - 1) / max(timings.last_token - timings.prefill_done, 1e-9)
    last.peak_memory_gb = peak_memory_gb()
    yield last


def _apply(step: Response, parser, text: str, token: int | None) -> None:
    if parser is None:
        step.text += text
        return
    if text or token is not None:
        _collect(step, parser.feed(token, text))


def _collect(step: Response, events) -> None:
    from qwenkit.text import stream as ev

    for e in events:
        if isinstance(e, ev.ReasoningDelta):
            step.reasoning += e.text
        elif isinstance(e, ev.ContentDelta):
            step.text += e.text
        elif isinstance(e, ev.ToolCall):
            step.tool_calls.append(ToolCallRecord(e.index, e.id, e.name, e.arguments))
        elif isinstance(e, ev.ToolCallError):
            step.tool_call_errors.append(ToolCallFailure(e.index, e.raw, e.message))
