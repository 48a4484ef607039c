"""Speculative decoding on the real default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M): greedy answers with prompt
lookup, and with a draft model, are the answers without speculation, token for token, batched together.

The draft here is the same file loaded a second time (the only real Qwen this machine has): every guess is kept,
so the test also shows the rows of a checking pass get exactly the logits of plain decode steps on the real block
kernels. The prompts are the speculative benchmark's (benchmarks/prompts): a code edit that returns the file and a
summary that quotes a tool's result, where prompt lookup finds most of the answer, and a question it does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenkit.engine.engine import Engine
from qwenkit.engine.speculative import Speculation

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

PROMPTS = Path(__file__).parents[2] / "benchmarks" / "prompts"
QUESTION = "In two sentences: why do CPUs decode language models faster with quantized weights?"


@pytest.fixture(scope="module")
def model(default_gguf):
    import qwenkit

    return qwenkit.load(default_gguf, pull=False)


def answers(model, speculation: Speculation | None) -> list[tuple[list[int], object]]:
    prompts = [(PROMPTS / "code_edit.txt").read_text(), (PROMPTS / "tool_summary.txt").read_text(), QUESTION]
    requests = [model.request(model.prepare_chat([{"role": "user", "content": p}], temperature=0, max_tokens=120))
                for p in prompts]
    with Engine(model.model, model.tokenizer, max_batch=3, speculation=speculation) as engine:
        streams = [engine.submit(r) for r in requests]
        out = []
        for s in streams:
            steps = list(s)
            out.append(([t for step in steps for t in step.tokens], steps[-1].speculation))
        return out


def test_greedy_answers_are_unchanged_by_speculation(model, default_gguf):
    import qwenkit

    plain = [tokens for tokens, _ in answers(model, None)]
    looked_up = answers(model, Speculation(lookup=4))
    assert [tokens for tokens, _ in looked_up] == plain
    code_edit = looked_up[0][1]
    assert code_edit.acceptance_rate > 0.5 and code_edit.tokens_per_pass > 2  # most of the file was guessed
    draft = qwenkit.load(default_gguf, pull=False).model
    drafted = answers(model, Speculation(draft=draft, draft_tokens=3))
    assert [tokens for tokens, _ in drafted] == plain
    assert all(s.accepted == s.proposed > 0 for _, s in drafted)  # its own weights: every guess kept
