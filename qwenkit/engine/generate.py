"""The generation loop for one request: chunked prefill into a preallocated KV cache, then one token per step.

`decode_tokens` yields token ids; `stream_responses` turns them into Responses (incremental UTF-8-safe text, stop
strings, and, for chat, the reasoning / content / tool-call split).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwenkit.engine.cache import KVCache
from qwenkit.engine.output import OutputProcessor
from qwenkit.engine.response import Response
from qwenkit.engine.sampling import Sampler, SamplingParams, TokenLogprob
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
    cache = KVCache.for_model(model, 1, len(prompt_ids) + max_new)
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
    constraint=None,
) -> Iterator[Response]:
    """Generate and yield one Response per token; the last one carries finish_reason, usage and speeds.

    `parser` (a text.stream.StreamParser) splits chat output into reasoning, content and tool calls; without it
    every token is plain text. `constraint` (qwenkit.engine.grammar) restricts which tokens may be sampled.
    """
    out = OutputProcessor(tokenizer, len(prompt_ids), params.stop, stop_ids, parser)
    sampler = Sampler(params, model.config.vocab_size, prompt_ids, constraint)
    timings = Timings()
    for token, logprob in decode_tokens(model, prompt_ids, sampler, max_new, stop_ids, timings):
        step = out.push(token, logprob)
        if step is not None:
            yield step
        if out.stopped:
            break
    last = out.finish(timings.started, timings.prefill_done, timings.last_token)
    last.peak_memory_gb = peak_memory_gb()
    yield last
