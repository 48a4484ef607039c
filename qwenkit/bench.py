"""`qwenkit bench`: prompt (prefill) and decode speed of one model on this machine, medians over repetitions."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from qwenkit.engine.engine import GenerationRequest
from qwenkit.engine.sampling import SamplingParams


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    prompt_tps: float  # median
    decode_tps: float  # median
    peak_memory_gb: float
    threads: int


def run_bench(model, prompt_tokens: int = 512, gen_tokens: int = 128, reps: int = 3) -> BenchResult:
    """Greedy decoding from a fixed pseudo-random prompt through the model's engine (a qwenkit.runtime.Model), as
    every entry point generates, ignoring end-of-text so every run decodes gen_tokens. Each repetition's prompt
    differs in its first token, so no repetition finds the previous one's keys in the prefix cache."""
    g = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 151643)
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist()
    prefill, decode, peak = [], [], 0.0
    for rep in range(reps):
        request = GenerationRequest([(prompt[0] + rep) % vocab, *prompt[1:]], SamplingParams(temperature=0.0),
                                    max_new_tokens=gen_tokens)
        for step in model.stream(request):
            if step.finish_reason is not None:
                prefill.append(step.prompt_tps)
                decode.append(step.generation_tps)
                peak = step.peak_memory_gb
    return BenchResult(
        prompt_tokens, gen_tokens, statistics.median(prefill), statistics.median(decode), peak,
        torch.get_num_threads(),
    )
