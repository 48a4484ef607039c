"""Generation through the public API (`qwenkit.load(path).generate / .chat`) on tiny random checkpoints.

What is checked: greedy equals an uncached argmax loop (so the KV cache is right) with one prefill forward and one
token per decode step; seeded sampling is reproducible; the Sampler's truncations and penalties are exact; max_tokens,
stop strings (split across tokens, never shown while streaming), stop token ids, logprobs, context overflow, bad
arguments, streaming == non-streaming, usage, chat on a Qwen3 template, and UTF-8-safe streaming.

A "scripted" model (the real tiny model underneath, so the KV cache still fills, but logits forcing a chosen token
sequence) drives the engine through text we choose: stop strings across token boundaries, multi-byte characters
split across byte tokens, <think> blocks.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import qwenkit
from qwenkit.engine.response import Response
from qwenkit.engine.sampling import Sampler, SamplingParams
from qwenkit.errors import BadRequest, ContextTooLong
from tests.fixtures_tiny import float32_engine
from tests.scripted import ScriptedLM, scripted

PROMPT = "Hello, world! The quick brown fox"
N = 16


# ------------------------------------------------------------------------------------------------------------- helpers


def manual_greedy(lm, prompt_ids: list[int], n: int, stop_ids: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Argmax loop with no KV cache: the whole sequence goes through the model at every step."""
    ids, out, rows = list(prompt_ids), [], []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm(torch.tensor([ids]))[0, -1].float()
            rows.append(torch.log_softmax(logits, -1))
            token = int(torch.argmax(logits))
            out.append(token)
            if token in stop_ids:
                break
            ids.append(token)
    return out, rows


def raw_logprobs(lm, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's raw logits predicting each of `tokens` (one uncached forward)."""
    with torch.inference_mode():
        logits = lm(torch.tensor([prompt_ids + tokens]))[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)], -1)


class ForwardLog:
    """Records the number of tokens of every forward call of a module (forward pre-hook)."""

    def __init__(self, module):
        self.calls: list[tuple[int, bool]] = []  # (tokens, cache given)
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.calls.append((ids.shape[1], kwargs.get("cache") is not None))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def stream_list(it) -> list[Response]:
    steps = list(it)
    assert steps, "a stream yields at least the final Response"
    return steps


def merged(steps: list[Response]) -> Response:
    total = Response()
    for s in steps:
        total.merge(s)
    return total


# ------------------------------------------------------------------------------------------------ greedy and the cache


def test_greedy_equals_uncached_argmax_and_prefill_runs_once(tiny_model):
    m = tiny_model
    prompt_ids = m.tokenizer.encode(PROMPT)
    with ForwardLog(m.model) as log:
        r = m.generate(PROMPT, temperature=0, max_tokens=N, logprobs=True)
    expected, rows = manual_greedy(m.model, prompt_ids, N, m.stop_token_ids)
    assert r.finish_reason == "length" and len(expected) == N, "precondition: no stop token in the greedy run"
    assert r.tokens == expected
    # One prefill forward with the whole prompt, then exactly one token per decode step, always with the cache.
    assert log.calls[0] == (len(prompt_ids), True)
    assert all(c == (1, True) for c in log.calls[1:]), log.calls
    assert len(log.calls) - 1 == N - 1, f"{len(log.calls) - 1} decode forwards for {N} tokens (the last is wasted)"
    # Cached logits equal uncached ones: the reported logprobs are the raw distribution at each step (the fixture's
    # engine keeps a float32 cache) ...
    for lp, row, tok in zip(r.logprobs, rows, expected):
        assert lp.token == tok
        assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
    # ... and, with the default float16 cache, within its rounding of keys and values (2^-11 relative each, grown
    # over 16 steps of this random model).
    m.start_engine()
    try:
        half = m.generate(PROMPT, temperature=0, max_tokens=N, logprobs=True)
    finally:
        float32_engine(m)
    assert half.tokens == expected
    for lp, row, tok in zip(half.logprobs, rows, expected):
        assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-2)


def test_greedy_is_deterministic_and_hf_gguf_agree(tiny_model, tiny_gguf_path):
    a = tiny_model.generate(PROMPT, temperature=0, max_tokens=N)
    b = tiny_model.generate(PROMPT, temperature=0, max_tokens=N)
    assert a.tokens == b.tokens and a.text == b.text
    g = qwenkit.load(tiny_gguf_path, pull=False)  # same weights (F32) and tokenizer, through the GGUF path
    c = g.generate(PROMPT, temperature=0, max_tokens=N)
    assert c.tokens == a.tokens and c.text == a.text


def test_chunked_prefill_matches(tiny_model):
    prompt = "def add(a, b):\n    return a + b\n"
    full = tiny_model.generate(prompt, temperature=0, max_tokens=8)
    n_prompt = len(tiny_model.tokenizer.encode(prompt))
    tiny_model.start_engine(prefill_chunk=3, kv_dtype=torch.float32)
    try:
        with ForwardLog(tiny_model.model) as log:
            chunked = tiny_model.generate(prompt, temperature=0, max_tokens=8)
    finally:
        float32_engine(tiny_model)
    assert chunked.tokens == full.tokens
    prefill = [t for t, _ in log.calls[: math.ceil(n_prompt / 3)]]
    assert sum(prefill) == n_prompt and max(prefill) == 3


def test_token_id_prompt_equals_text_prompt(tiny_model):
    ids = tiny_model.tokenizer.encode(PROMPT)
    a = tiny_model.generate(PROMPT, temperature=0, max_tokens=6)
    b = tiny_model.generate(ids, temperature=0, max_tokens=6)
    assert a.tokens == b.tokens and a.usage.prompt_tokens == b.usage.prompt_tokens == len(ids)


# ----------------------------------------------------------------------------------------------------- seeded sampling


def test_same_seed_same_text_different_seeds_differ(tiny_model):
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_tokens=12)
    a = tiny_model.generate(PROMPT, seed=7, **kw)
    b = tiny_model.generate(PROMPT, seed=7, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    outs = {tuple(tiny_model.generate(PROMPT, seed=s, **kw).tokens) for s in range(6)}
    assert len(outs) >= 3, "six seeds gave (almost) the same sample"


def test_top_k_1_equals_greedy(tiny_model):
    greedy = tiny_model.generate(PROMPT, temperature=0, max_tokens=N)
    for seed in (0, 1, 2):
        r = tiny_model.generate(PROMPT, temperature=1.5, top_k=1, top_p=1.0, seed=seed, max_tokens=N)
        assert r.tokens == greedy.tokens


# -------------------------------------------------------------------------------------------------- the Sampler itself


def draw(params: SamplingParams, logits: torch.Tensor, n: int) -> Counter:
    sampler = Sampler(params, logits.numel(), [])
    return Counter(sampler(logits.clone())[0] for _ in range(n))


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 4000
    counts = draw(SamplingParams(temperature=0.7, seed=123), logits, n)
    expected = torch.softmax(logits / 0.7, -1)
    for i, p in enumerate(expected.tolist()):
        assert abs(counts[i] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (i, counts[i] / n, p)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, 1.7, -0.2, 0.0])
    counts = draw(SamplingParams(temperature=1.0, top_k=3, seed=1), logits, 1500)
    assert set(counts) == {1, 5, 3}  # the three largest logits, each drawn
    kept = torch.softmax(logits[[1, 5, 3]], -1).tolist()
    for tok, p in zip([1, 5, 3], kept):
        assert abs(counts[tok] / 1500 - p) < 0.05


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.1, {0}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    counts = draw(SamplingParams(temperature=1.0, top_p=top_p, seed=2), logits, 3000)
    assert set(counts) == kept
    mass = sum(probs[i] for i in kept)
    for tok in kept:  # renormalised over the kept set
        assert abs(counts[tok] / 3000 - float(probs[tok] / mass)) < 0.04


@pytest.mark.parametrize("min_p, kept", [(0.25, {0, 1, 2}), (0.35, {0, 1}), (0.0, {0, 1, 2, 3}), (1.0, {0})])
def test_min_p_drops_below_fraction_of_top(min_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    counts = draw(SamplingParams(temperature=1.0, min_p=min_p, seed=3), logits, 3000)
    assert set(counts) == kept


def test_penalties_arithmetic():
    """repetition (transformers: over prompt + output, divide positives, multiply negatives), then frequency and
    presence (OpenAI: over output tokens only, minus f * count and p * [count > 0])."""
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    sampler = Sampler(params, 6, prompt_ids=[0, 1])
    for forced in (2, 2, 3):  # output tokens: 2 twice, 3 once (logit 100 wins whatever the penalties)
        one_hot = torch.full((6,), -5.0)
        one_hot[forced] = 100.0
        assert sampler(one_hot)[0] == forced
    base = torch.tensor([2.0, -1.0, 3.0, -0.5, 1.0, 0.7])
    got = sampler.penalise(base.clone())
    rep = torch.tensor([1.0, -2.0, 1.5, -1.0, 1.0, 0.7])  # ids 0..3 seen; 4, 5 untouched
    counts = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0, 0.0])
    expected = rep - 0.5 * counts - 0.25 * (counts > 0).float()
    assert torch.allclose(got, expected), (got, expected)
    # And they steer the choice: without penalties 2 wins; with them 0 (1.0) beats 2 (1.5 - 1.0 - 0.25 = 0.25).
    assert sampler(base.clone())[0] == 0


def test_greedy_logprobs_are_raw_not_penalised():
    params = SamplingParams(temperature=0, repetition_penalty=3.0, logprobs=True, top_logprobs=3)
    sampler = Sampler(params, 4, prompt_ids=[0])
    logits = torch.tensor([3.0, 2.0, 0.5, -1.0])
    token, lp = sampler(logits.clone())
    assert token == 1  # 3.0 / 3 = 1.0 < 2.0
    raw = torch.log_softmax(logits, -1)
    assert lp.logprob == pytest.approx(float(raw[1]))
    assert [t for t, _ in lp.top] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------------ stopping


def test_max_tokens_gives_length_and_exact_count(tiny_model):
    for n in (1, 5):
        r = tiny_model.generate(PROMPT, temperature=0, max_tokens=n)
        assert r.finish_reason == "length"
        assert len(r.tokens) == n and r.usage.completion_tokens == n


def scripted_text(model, text: str) -> list[int]:
    ids = model.tokenizer.encode(text)
    assert len(ids) >= 4
    return ids


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_split_across_tokens(tiny_model, stream):
    text = "The quick brown fox jumps over the lazy dog. Hello"
    script = scripted_text(tiny_model, text)
    pieces = [tiny_model.tokenizer.decode([t]) for t in script]
    assert "".join(pieces) == text
    # A stop string over three tokens that starts inside the first one and ends inside the last one.
    i = next(k for k in range(len(pieces) - 2) if len(pieces[k]) >= 2 and len(pieces[k + 2]) >= 2)
    before = "".join(pieces[:i])
    stop = pieces[i][-1] + pieces[i + 1] + pieces[i + 2][0]
    cut = text.find(stop)
    assert cut == len(before) + len(pieces[i]) - 1, "precondition: the stop string first occurs there"
    m = scripted(tiny_model, script + [tiny_model.tokenizer.eos_token_id])
    out = m.generate("x", temperature=0, max_tokens=len(script) + 1, stop=[stop, "never there"], stream=stream)
    if stream:
        steps = stream_list(out)
        shown = ""
        for s in steps:
            shown += s.text
            assert text[:cut].startswith(shown), f"streamed text {shown!r} shows part of the stop string {stop!r}"
        r = merged(steps)
    else:
        r = out
    assert r.text == text[:cut]
    assert r.finish_reason == "stop"
    assert r.tokens == script[: i + 3]  # generation ends at the token that completed the stop string


def test_stop_string_held_back_then_released(tiny_model):
    """A partial match that turns out not to be the stop string is shown in full, in order."""
    text = "the lazy dog. the lazy cat"
    script = scripted_text(tiny_model, text)
    m = scripted(tiny_model, script)
    steps = stream_list(m.generate("x", temperature=0, max_tokens=len(script), stop=["lazy cow"], stream=True))
    assert "".join(s.text for s in steps) == text
    assert steps[-1].finish_reason == "length"


def test_stop_string_at_first_token_gives_empty_text(tiny_model):
    script = scripted_text(tiny_model, "Hello, world! 你好")
    first = tiny_model.tokenizer.decode(script[:1])
    r = scripted(tiny_model, script).generate("x", temperature=0, max_tokens=10, stop=[first])
    assert r.text == "" and r.finish_reason == "stop"


def test_stop_token_ids(tiny_model):
    greedy = tiny_model.generate(PROMPT, temperature=0, max_tokens=N).tokens
    k = next(k for k in range(2, N) if greedy[k] not in greedy[:k])
    r = tiny_model.generate(PROMPT, temperature=0, max_tokens=N, stop_token_ids=[greedy[k]])
    assert r.finish_reason == "stop"
    assert r.tokens == greedy[:k]  # the stop token itself is not part of the output
    assert r.text == tiny_model.tokenizer.decode(greedy[:k], skip_special_tokens=True)
    assert r.usage.completion_tokens == k + 1  # but it was generated


def test_eos_token_stops_and_is_not_shown(tiny_model):
    script = scripted_text(tiny_model, "Hello, world!") + [tiny_model.tokenizer.token_to_id("<|im_end|>")]
    r = scripted(tiny_model, script).generate("x", temperature=0, max_tokens=50)
    assert r.text == "Hello, world!" and r.finish_reason == "stop"
    assert r.usage.completion_tokens == len(script)


# ------------------------------------------------------------------------------------------------------------ logprobs


def test_sampled_logprobs_are_raw_log_softmax_and_top_sorted(tiny_model):
    m = tiny_model
    prompt_ids = m.tokenizer.encode(PROMPT)
    r = m.generate(PROMPT, temperature=0.9, top_k=5, seed=11, max_tokens=10, logprobs=True, top_logprobs=4)
    assert len(r.logprobs) == len(r.tokens)
    rows = raw_logprobs(m.model, prompt_ids, r.tokens)
    for i, (lp, tok) in enumerate(zip(r.logprobs, r.tokens)):
        assert lp.token == tok
        assert lp.logprob == pytest.approx(float(rows[i, tok]), abs=1e-4)
        assert len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        best = torch.topk(rows[i], 4)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-4)


def test_no_logprobs_unless_asked(tiny_model):
    r = tiny_model.generate(PROMPT, temperature=0, max_tokens=3)
    assert r.logprobs == []
    r = tiny_model.generate(PROMPT, temperature=0, max_tokens=3, logprobs=True)
    assert len(r.logprobs) == 3 and all(lp.top == [] for lp in r.logprobs)


# --------------------------------------------------------------------------------------------------- limits and errors


def test_prompt_longer_than_context(tiny_model):
    ctx = tiny_model.context_length
    long_prompt = list(range(10, 10 + ctx + 5))
    with pytest.raises(ContextTooLong) as e:
        tiny_model.generate(long_prompt, max_tokens=1)
    msg = str(e.value)
    assert str(ctx + 5) in msg and str(ctx) in msg
    with pytest.raises(ContextTooLong):
        tiny_model.generate(list(range(10, 10 + ctx)), max_tokens=1)  # no room for even one token
    with pytest.raises(ContextTooLong):
        tiny_model.chat([{"role": "user", "content": "hello " * ctx}])


def test_generation_stops_at_context_end(tiny_model):
    ctx = tiny_model.context_length
    prompt = list(range(10, 10 + ctx - 4))
    r = tiny_model.generate(prompt, temperature=0, max_tokens=100, stop_token_ids=[])
    assert r.usage.completion_tokens <= 4
    if r.finish_reason == "length":
        assert r.usage.completion_tokens == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(repetition_penalty=0),
        dict(top_logprobs=21),
        dict(stop=[""]),
        dict(temprature=0.5),  # unknown name
        dict(max_new_tokens=5),  # transformers' name, not ours
        dict(temperature="hot"),
        dict(max_tokens=2.5),
        dict(top_k=2.5),
        dict(stop=5),
        dict(seed="x"),
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bad_sampling_arguments(tiny_model, kwargs):
    with pytest.raises(BadRequest) as e:
        tiny_model.generate(PROMPT, **kwargs)
    assert next(iter(kwargs)) in str(e.value)
    with pytest.raises(BadRequest):
        tiny_model.chat([{"role": "user", "content": "hi"}], **kwargs)


@pytest.mark.parametrize("prompt", ["", [], [10**6], [-1], [1.5], None])
def test_bad_prompts(tiny_model, prompt):
    with pytest.raises(BadRequest):
        tiny_model.generate(prompt)


# ------------------------------------------------------------------------------------------------- streaming and usage


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_k=0, top_p=1.0, seed=5)])
def test_stream_concatenates_to_non_streamed(tiny_model, kw):
    whole = tiny_model.generate(PROMPT, max_tokens=N, logprobs=True, **kw)
    steps = stream_list(tiny_model.generate(PROMPT, max_tokens=N, logprobs=True, stream=True, **kw))
    assert all(s.finish_reason is None for s in steps[:-1]) and steps[-1].finish_reason == whole.finish_reason
    assert all(len(s.tokens) == 1 for s in steps[:-1] if s.tokens)
    assert "".join(s.text for s in steps) == whole.text
    got = merged(steps)
    assert got.tokens == whole.tokens
    assert [lp.token for lp in got.logprobs] == whole.tokens
    assert got.usage == whole.usage


def test_usage_counts(tiny_model):
    r = tiny_model.generate(PROMPT, temperature=0, max_tokens=7)
    n_prompt = len(tiny_model.tokenizer.encode(PROMPT))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(r.tokens) == 7
    assert r.usage.total_tokens == n_prompt + 7
    assert r.prompt_tps > 0 and r.generation_tps > 0 and r.time_to_first_token > 0 and r.peak_memory_gb > 0


# ---------------------------------------------------------------------------------------------------------------- chat


@pytest.mark.parametrize("thinking", [True, False, None])
def test_qwen3_chat_thinking_on_off(tiny_qwen3_model, thinking):
    m = tiny_qwen3_model
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = m.render(messages, enable_thinking=thinking)
    assert prompt.endswith("<think>\n\n</think>\n\n") == (thinking is False)
    r = m.chat(messages, enable_thinking=thinking, max_tokens=8, seed=0)
    assert isinstance(r, Response)
    assert r.finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens == len(m.tokenizer.encode(prompt))
    steps = stream_list(m.chat(messages, enable_thinking=thinking, max_tokens=8, seed=0, stream=True))
    s = merged(steps)
    assert (s.text, s.reasoning, s.tokens) == (r.text, r.reasoning, r.tokens)


def test_qwen3_chat_splits_reasoning_and_content(tiny_qwen3_model):
    m = tiny_qwen3_model
    tok = m.tokenizer
    script = tok.encode("<think>\nLet me add: 2 + 2 = 4.\n</think>\n\nThe answer is 4.") + [tok.eos_token_id]
    r = scripted(m, script).chat([{"role": "user", "content": "2 + 2?"}], max_tokens=60)
    assert r.reasoning.strip() == "Let me add: 2 + 2 = 4."
    assert r.text.strip() == "The answer is 4."
    assert r.finish_reason == "stop"


def test_qwen25_chat_uses_default_system_prompt(tiny_model):
    prompt = tiny_model.render([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert prompt.endswith("<|im_start|>assistant\n")
    r = tiny_model.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=5)
    assert r.usage.prompt_tokens == len(tiny_model.tokenizer.encode(prompt))


# ------------------------------------------------------------------------------------------------------------- unicode


def test_stream_never_splits_a_character(tiny_model):
    """Characters outside the training corpus are 2-4 byte tokens each: no delta may show half of one."""
    text = "naïve 𝄞 music, 汉字 and 🦀 crabs: ∑ ≠ ∞"
    script = scripted_text(tiny_model, text)
    pieces = [tiny_model.tokenizer.decode([t]) for t in script]
    assert any("\ufffd" in p for p in pieces), "precondition: some character spans several tokens"
    steps = stream_list(scripted(tiny_model, script).generate("x", temperature=0, max_tokens=len(script), stream=True))
    assert all("\ufffd" not in s.text for s in steps)
    assert "".join(s.text for s in steps) == text


def test_sampled_streams_have_no_replacement_char_when_decode_has_none(tiny_model):
    for seed in range(6):
        steps = stream_list(
            tiny_model.generate(
                "你好,世界!😀", temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=12, stream=True
            )
        )
        tokens = [t for s in steps for t in s.tokens]
        full = tiny_model.tokenizer.decode(tokens, skip_special_tokens=True)
        streamed = "".join(s.text for s in steps)
        assert streamed == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in s.text for s in steps)
