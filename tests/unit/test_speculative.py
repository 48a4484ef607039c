"""Speculative decoding (qwenkit.engine.speculative) on tiny random models of every architecture.

What is checked:
- greedy text with prompt lookup, with a draft model (the target's own weights: every guess kept; other weights:
  most guesses rejected), and with both, equals greedy text without speculation, token for token, for requests
  batched, chunked and prefix-cached together; and no KV block stays held, in the target's pool or the draft's;
- seeded sampling repeats exactly, alone or batched;
- rejection sampling keeps the target's distribution: chi-square tests of Sampler.check against p for a drawn guess
  (q given) and a lookup guess (q none), and of whole answers from the engine against the target's exact joint
  distribution of two tokens that follow guesses;
- a draft of another vocabulary is refused at load, naming the draft.
"""

from __future__ import annotations

import pytest
import torch

from qwenkit.engine.engine import Engine, GenerationRequest
from qwenkit.engine.sampling import Sampler, SamplingParams
from qwenkit.engine.speculative import SpecState, Speculation, check_vocabulary, verify
from qwenkit.errors import BadConfig
from tests.tiny_checkpoint import other_vocabulary, tiny_model
from tests.unit.test_engine import ARCHITECTURES, PROMPTS, alone, run_all, wait_idle

# Prompts that repeat themselves, so that prompt lookup finds matches (the tiny models also repeat themselves).
LOOKUP_PROMPTS = PROMPTS + ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a +",
                            "one two three four, one two three four, one two"]
# A chi-square test at this p-value: a correct sampler fails it once in 1,000 draws of the random streams. The
# seeds below are fixed, so each test gives the same verdict every run; a wrong acceptance rule (keeping a guess
# with probability p instead of min(1, p/q), or not renormalising the residual) fails by p-values below 1e-30.
ALPHA = 1e-3


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model.tokenizer


def greedy(ids, max_new=24) -> GenerationRequest:
    return GenerationRequest(ids, SamplingParams(temperature=0), max_new_tokens=max_new)


def speculations(arch: str) -> dict[str, Speculation]:
    return {
        "lookup": Speculation(lookup=4),
        "draft-same": Speculation(draft=tiny_model(arch), draft_tokens=3),
        "draft-other": Speculation(draft=tiny_model(arch, seed=1), draft_tokens=5),
        "lookup+draft": Speculation(draft=tiny_model(arch, seed=1), lookup=2),
    }


def answers(engine, requests):
    """(tokens, speculation stats) of each request."""
    streams = [engine.submit(r) for r in requests]
    out = []
    for s in streams:
        tokens, last = [], None
        for step in s:
            tokens += step.tokens
            last = step
        out.append((tokens, last.speculation))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_text_is_the_text_without_speculation(arch, tok):
    model = tiny_model(arch)
    prompts = [tok.encode(p) for p in LOOKUP_PROMPTS]
    expected = [alone(model, tok, p, 24) for p in prompts]
    for name, spec in speculations(arch).items():
        with Engine(model, tok, max_batch=4, block_size=4, prefill_chunk=8, speculation=spec) as engine:
            got = answers(engine, [greedy(p) for p in prompts])
            assert [t for t, _ in got] == expected, name
            assert [t for t, _ in answers(engine, [greedy(p) for p in prompts])] == expected, name  # prefix cache
            wait_idle(engine)
            assert engine.stats().kv_blocks_used == 0, name
            draft = engine.scheduler.proposer.draft
            assert draft is None or (draft.pool.used == 0 and not draft.shadows), name
            stats = engine.stats()
            assert stats.spec_proposed > 0, name
            if name == "draft-same":  # the target's own weights guess: every guess is kept
                assert stats.spec_accepted == stats.spec_proposed
                assert all(s.tokens_per_pass > 2 for _, s in got)
            assert stats.decode_tokens == stats.decode_passes + stats.spec_accepted or name != "draft-same"


def test_seeded_sampling_repeats_alone_and_batched(tok):
    model = tiny_model("qwen3-headdim")
    prompts = [tok.encode(p) for p in LOOKUP_PROMPTS]
    params = dict(temperature=0.9, top_p=0.9, seed=7)
    for spec in (Speculation(draft=tiny_model("qwen3-headdim", seed=1)), Speculation(lookup=3)):
        def requests():
            return [GenerationRequest(p, SamplingParams(**params), 16) for p in prompts]

        with Engine(model, tok, max_batch=1, speculation=spec) as engine:
            one_by_one = [run_all(engine, [r])[0] for r in requests()]
        with Engine(model, tok, max_batch=8, block_size=4, speculation=spec) as engine:
            assert run_all(engine, requests()) == one_by_one
            assert run_all(engine, requests()) == one_by_one


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of observed counts against expected probabilities (cells with expected count < 5 pooled)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].sum().double().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("guess_from", ["draft", "lookup"])
def test_check_keeps_the_target_distribution(guess_from):
    vocab = 8
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0])
    q = torch.softmax(torch.tensor([0.0, 2.5, 0.5, 0.5, 1.0, 0.0, 0.0, 1.0]), -1)  # guesses far from p
    params = SamplingParams(temperature=0.8, top_k=6, seed=3)
    sampler = Sampler(params, vocab, [])
    p = sampler.distribution(sampler._scores(logits.clone()))
    p = p / p.sum()
    guesses = torch.Generator().manual_seed(11)
    counts = torch.zeros(vocab)
    draws = 20000
    for _ in range(draws):
        if guess_from == "draft":
            guess, dist = int(torch.multinomial(q, 1, generator=guesses)), q
        else:
            guess, dist = 1, None  # always the same token, which p ranks second
        token, _ = sampler.check(logits, guess, dist)
        counts[token] += 1
    assert chi_square_p_value(counts, p) > ALPHA
    assert counts[p == 0].sum() == 0  # top-k's dropped tokens never come out, even when guessed


def test_engine_answers_keep_the_target_distribution(tok):
    """Whole answers of four tokens: the first comes from the prompt's pass, the next from one pass that checks two
    guesses of a draft (weights near the target's: guesses often kept, often rejected), the rest from the pass
    after. Their joint distribution over many seeded requests must be the target's own, computed exactly from the
    model's logits (top-k and top-p keep at most 4 tokens a position)."""
    target, draft = tiny_model("qwen2"), tiny_model("qwen2")
    with torch.no_grad():  # a draft near the target: guesses often inside its top-k, yet often rejected
        for mine, other in zip(draft.parameters(), tiny_model("qwen2", seed=1).parameters()):
            mine.add_(other, alpha=0.1)
    params = dict(temperature=1.0, top_k=4, top_p=0.7)
    prompt = tok.encode("Hello, world! The quick brown fox")
    with torch.inference_mode():
        def dist(ids):
            sampler = Sampler(SamplingParams(**params), target.config.vocab_size, [])
            p = sampler.distribution(sampler._scores(target(torch.tensor([ids]))[0, -1].float()))
            return p / p.sum()

        joint = {(): 1.0}
        for _ in range(4):  # extend every answer so far by each token the target may sample next
            joint = {answer + (t,): prob * float(p[t]) for answer, prob in joint.items()
                     for p in [dist(prompt + list(answer))] for t in torch.nonzero(p).flatten().tolist()}
    cells = sorted(joint)
    index = {cell: i for i, cell in enumerate(cells)}
    counts = torch.zeros(len(cells) + 1)
    spec = Speculation(draft=draft, draft_tokens=2)
    with Engine(target, tok, max_batch=32, max_queue=4000, block_size=4, kv_dtype=torch.float32,
                speculation=spec) as engine:
        requests = [GenerationRequest(prompt, SamplingParams(**params, seed=s), 4) for s in range(3000)]
        for tokens in run_all(engine, requests):
            counts[index.get(tuple(tokens), len(cells))] += 1
        stats = engine.stats()
    assert counts[-1] == 0  # nothing outside the target's top-k
    assert chi_square_p_value(counts[:-1], torch.tensor([joint[c] for c in cells])) > ALPHA
    assert stats.spec_proposed > 5000 and 0.2 < stats.spec_accepted / stats.spec_proposed < 0.8  # both paths ran


def test_verify_greedy_keeps_guesses_up_to_the_first_miss():
    sampler = Sampler(SamplingParams(temperature=0), 5, [])
    logits = torch.eye(5)[[1, 2, 3, 4]] * 5  # the argmax after each row: 1, 2, 3, 4
    assert [t for t, _ in verify(sampler, logits, [1, 2, 0], None)] == [1, 2, 3]
    assert [t for t, _ in verify(sampler, logits, [1, 2, 3], None)] == [1, 2, 3, 4]


def test_guessing_adapts_and_pauses_after_misses():
    state = SpecState(longest=6, lookup=False)
    assert state.wanted(room=100) == 6
    state.record(6, 2)
    assert state.wanted(room=100) == 5  # shorter after a guess cut short
    assert state.wanted(room=3) == 3  # never past the request's own limit
    for _ in range(3):
        state.record(4, 0)
    assert [state.wanted(100) for _ in range(8)] == [0] * 8  # paused
    assert state.wanted(100) > 0
    for _ in range(3):
        state.record(2, 0)
    assert [state.wanted(100) for _ in range(16)] == [0] * 16  # paused twice as long
    state.record(2, 2)
    assert state.proposed == 6 + 12 + 6 + 2 and state.accepted == 4


def test_a_draft_of_another_vocabulary_is_refused(tiny_hf_path, tmp_path):
    import qwenkit

    other = other_vocabulary(tiny_hf_path, tmp_path / "other")
    target = qwenkit.load(tiny_hf_path, pull=False)
    with pytest.raises(BadConfig, match="draft model .*other.*vocabulary differs"):
        check_vocabulary(target.tokenizer, qwenkit.load(other, pull=False).tokenizer, str(other))
    check_vocabulary(target.tokenizer, qwenkit.load(tiny_hf_path, pull=False).tokenizer, "same")
