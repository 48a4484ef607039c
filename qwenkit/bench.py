"""`qwenkit bench`: prompt (prefill) and decode speed of one model on this machine, medians over repetitions."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from qwenkit.engine.generate import Timings, decode_tokens, peak_memory_gb
from qwenkit.engine.sampling import Sampler, SamplingParams


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    prompt_tps: float  # median
    decode_tps: float  # median
    peak_memory_gb: float
    threads: int


def run_bench(model, prompt_tokens: int = 512, gen_tokens: int = 128, reps: int = 3) -> BenchResult:
    """Greedy decoding from a fixed pseudo-random prompt, ignoring end-of-text so every run decodes gen_tokens."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(model.config.vocab_size, 151643), (prompt_tokens,), generator=g).tolist()
    prefill, decode = [], []
    for _ in range(reps):
        timings = Timings()
        sampler = Sampler(SamplingParams(temperature=0.0), model.config.vocab_size, [])
        n = sum(1 for _ in decode_tokens(model, prompt, sampler, gen_tokens, set(), timings))
        prefill.append(prompt_tokens / (timings.prefill_done - timings.started))
        decode.append((n - 1) / max(timings.last_token - timings.prefill_done, 1e-9))
    return BenchResult(
        prompt_tokens, gen_tokens, statistics.median(prefill), statistics.median(decode), peak_memory_gb(),
        torch.get_num_threads(),
    )
