"""Quality of the quantized paths on the real default model, against its dequantized fp32 reference.

Two measures, on fixed inputs:
- greedy agreement: the fp32 model answers 5 prompts greedily (64 tokens); the quantized model is fed the same
  prompt and then the reference's answer one token at a time through its KV cache (the decode kernels), and we
  count the steps where its own greedy choice equals the reference's next token (teacher forcing, so one early
  difference does not decide the rest). Bar: at least 90%.
- perplexity over a fixed text of ~2,400 tokens (the Apache License 2.0), computed in 512-token chunks (the
  prefill kernels): the quantized model's may differ from the reference's by at most 2%.
`auto` and `int8` are checked. `int4` re-quantizes this file's 5- to 8-bit tensors to 4 bits and does not keep
quality (about +18% perplexity here); it is a size option, measured by benchmarks/cpu.py, not tested against the bars.
"""

import math
from pathlib import Path

import pytest
import torch

from tests.paged_steps import PagedSequence

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

PROMPTS = [
    "Explain what a hash map is in two sentences.",
    "Translate into English: 今天天气很好，我们去公园散步吧。",
    "Write a Python function that reverses a linked list.",
    "List three uses of the Linux command grep.",
    "What is 17 times 23? Show your working.",
]
ANSWER_TOKENS = 64
TEXT = Path(__file__).parent.parent / "fixtures" / "apache-2.0.txt"


def _model(path, quant):
    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.runtime import Model

    return Model(open_checkpoint(path), quant=quant)


@pytest.fixture(scope="module")
def reference(default_gguf):
    model = _model(default_gguf, "none")
    sequences = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = model.tokenizer.encode(model.render(messages))
        answer = model.chat(messages, temperature=0, max_tokens=ANSWER_TOKENS).tokens
        sequences.append((prompt_ids, answer))
    return model, sequences


def greedy_agreement(model, sequences) -> float:
    agree = total = 0
    for prompt_ids, answer in sequences:
        sequence = PagedSequence(model.model, len(prompt_ids) + len(answer))  # as generation runs
        logits = sequence(prompt_ids)
        for token in answer:
            agree += int(logits.argmax(-1)) == token
            total += 1
            logits = sequence([token], generated=True)
    return agree / total


def perplexity(model, chunk: int = 512) -> float:
    ids = model.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    sequence = PagedSequence(model.model, len(ids))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk]
        logits = sequence(piece, logits="all")
        targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)])
        logprobs = torch.log_softmax(logits[0, : len(targets)].float(), dim=-1)
        nll -= logprobs.gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def reference_perplexity(reference):
    return perplexity(reference[0])


@pytest.mark.parametrize("quant", ["auto", "int8"])
def test_quantized_quality_close_to_fp32(default_gguf, reference, reference_perplexity, quant):
    model = _model(default_gguf, quant)
    agreement = greedy_agreement(model, reference[1])
    ppl = perplexity(model)
    change = ppl / reference_perplexity - 1
    print(f"quant={quant}: greedy agreement {agreement:.1%}, perplexity {ppl:.4f} vs fp32 {reference_perplexity:.4f} "
          f"({change:+.2%})")
    assert agreement >= 0.90
    assert abs(change) <= 0.02
