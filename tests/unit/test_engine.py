"""The batching engine (qwenkit.engine.engine) on tiny random models of every architecture.

What is checked: requests batched together, joining mid-flight, prefilled in chunks over several steps, sharing
prefix-cached blocks, or preempted when the block pool runs out, produce exactly the tokens each one produces
alone (a batch of one, its prompt in one pass); aborts and timeouts free every block; a full queue refuses;
shutdown drains.
"""

from __future__ import annotations

import asyncio

import pytest

from qwenkit.engine.engine import Engine, GenerationRequest
from qwenkit.engine.sampling import SamplingParams
from qwenkit.errors import EngineStopped, Overloaded, RequestTimeout
from tests.tiny_checkpoint import tiny_model

ARCHITECTURES = ["qwen2", "qwen2-tied-sliding", "qwen3-headdim", "qwen2_moe-shared", "qwen3_moe"]
PROMPTS = [
    "Hello, world! The quick brown fox",
    "A",
    "The quick brown fox jumps over the lazy dog again and again, and then once more for luck.",
    "Hello, world! The quick brown fox jumps",  # shares a prefix with the first
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Hello, world!",
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model.tokenizer


def alone(model, tok, prompt_ids, max_new, params=None) -> list[int]:
    """The reference: the request by itself, in an engine of one slot that takes its whole prompt in one pass."""
    with Engine(model, tok, max_batch=1, prefill_chunk=4096) as engine:
        request = GenerationRequest(prompt_ids, params or SamplingParams(temperature=0), max_new)
        return run_all(engine, [request])[0]


def run_all(engine, requests) -> list[list[int]]:
    streams = [engine.submit(r) for r in requests]
    results = []
    for s in streams:
        results.append([t for step in s for t in step.tokens])
    return results


def greedy(ids, max_new=12, **kw) -> GenerationRequest:
    return GenerationRequest(ids, SamplingParams(temperature=0, **kw), max_new_tokens=max_new)


def wait_idle(engine, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while not engine.idle and time.monotonic() < end:
        time.sleep(0.01)
    assert engine.idle


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_chunked_prefix_cached_equals_alone(arch, tok):
    model = tiny_model(arch)
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = [alone(model, tok, p, 12) for p in prompts]
    # Small blocks and chunks, and fewer batch slots than requests: prompts span blocks and steps, requests queue,
    # join while others decode, and the shared prefix is served from the cache.
    with Engine(model, tok, max_batch=4, block_size=4, prefill_chunk=8) as engine:
        assert run_all(engine, [greedy(p) for p in prompts]) == expected
        assert engine.stats().prefix_cache_hits > 0
        assert run_all(engine, [greedy(p) for p in prompts]) == expected  # now mostly from the prefix cache
        wait_idle(engine)
        assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("weights", ["gguf-q8_0", "gguf-q8_0-no-bf16", "int8", "int4"])
def test_quantized_layers_keep_batched_chunked_prefix_cached_equal_alone(weights, tok, tmp_path, monkeypatch):
    """Quantized layers run generated tokens on their row kernels and prompt tokens on the matrix kernel, whatever
    shares the step: chunks of 8 prompt rows (padded to the matrix kernel's 16) and prefix-cache hits give the
    tokens of the prompt in one pass. Without native bf16 (forced off: an AVX2 or Arm CPU), the plan runs Q8_0
    prompts on the block kernels too, with the same guarantee."""
    import qwenkit
    from qwenkit.kernels.library import available
    from qwenkit.quant.plan import KernelPlan
    from tests.tiny_checkpoint import tiny_gguf, tiny_hf_folder

    if weights.startswith("gguf"):
        gguf = pytest.importorskip("gguf")
        if not available():
            pytest.skip("GGUF blocks run on the C kernels only where they are built")
        if weights.endswith("no-bf16"):
            monkeypatch.setenv("QWENKIT_BF16", "0")
        model = qwenkit.load(tiny_gguf(tmp_path, "qwen2", qtype=gguf.GGMLQuantizationType.Q8_0), pull=False).model
        prompt_on_blocks = model.model.layers[0].mlp.down_proj.prompt_on_blocks
        assert prompt_on_blocks == (weights.endswith("no-bf16") or not KernelPlan.detect().bf16)
    else:
        model = qwenkit.load(tiny_hf_folder(tmp_path / "hf"), pull=False, quant=weights).model
    prompts = [tok.encode(p) for p in PROMPTS + [" ".join(PROMPTS)]]  # the last past FUSED_MAX_ROWS tokens
    expected = [alone(model, tok, p, 12) for p in prompts]
    with Engine(model, tok, max_batch=4, block_size=4, prefill_chunk=8) as engine:
        assert run_all(engine, [greedy(p) for p in prompts]) == expected
        assert run_all(engine, [greedy(p) for p in prompts]) == expected  # now mostly from the prefix cache
        assert engine.stats().prefix_cache_hits > 0


def test_preemption_when_the_pool_runs_out_loses_nothing(tok):
    model = tiny_model("qwen2")
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    expected = [alone(model, tok, p, 40) for p in prompts]
    # 24 blocks of 4 tokens: not enough for four sequences of ~60 tokens at once, so some are preempted and recomputed.
    with Engine(model, tok, max_batch=4, block_size=4, kv_blocks=24, prefill_chunk=8) as engine:
        assert run_all(engine, [greedy(p, 40) for p in prompts]) == expected
        assert engine.stats().preemptions > 0
        wait_idle(engine)
        assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_the_same_batched(tok):
    model = tiny_model("qwen3-headdim")
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    params = dict(temperature=0.9, top_p=0.9, seed=7)
    expected = [alone(model, tok, p, 10, SamplingParams(**params)) for p in prompts]
    with Engine(model, tok, max_batch=8, block_size=4) as engine:
        got = run_all(engine, [GenerationRequest(p, SamplingParams(**params), 10) for p in prompts])
        assert got == expected


def test_abort_and_timeout_free_every_block(tok):
    model = tiny_model("qwen2")
    with Engine(model, tok, max_batch=4, block_size=4) as engine:
        streams = [engine.submit(greedy(tok.encode(p), 200)) for p in PROMPTS[:4]]
        for s in streams:
            next(iter(s))
            s.abort()
        slow = engine.submit(GenerationRequest(tok.encode(PROMPTS[2]), SamplingParams(temperature=0), 200,
                                               timeout=1e-4))
        with pytest.raises(RequestTimeout):
            list(slow)
        wait_idle(engine)
        assert engine.stats().kv_blocks_used == 0
        assert run_all(engine, [greedy(tok.encode(PROMPTS[0]))]) == [alone(model, tok, tok.encode(PROMPTS[0]), 12)]


def test_async_iteration_and_early_exit_aborts(tok):
    model = tiny_model("qwen2")

    async def main(engine):
        full = engine.submit(greedy(tok.encode(PROMPTS[0])))
        tokens = [t async for step in full for t in step.tokens]
        partial = engine.submit(greedy(tok.encode(PROMPTS[2]), 500))
        async for _ in partial:
            break  # the consumer goes away, as a disconnected client's handler does
        return tokens

    with Engine(model, tok, max_batch=4, block_size=4) as engine:
        assert asyncio.run(main(engine)) == alone(model, tok, tok.encode(PROMPTS[0]), 12)
        wait_idle(engine)
        assert engine.stats().kv_blocks_used == 0


def test_full_queue_refuses_and_shutdown_drains(tok):
    model = tiny_model("qwen2")
    engine = Engine(model, tok, max_batch=1, max_queue=2, block_size=4)
    first = engine.submit(greedy(tok.encode(PROMPTS[0])))  # takes the one batch slot
    engine.submit(greedy(tok.encode(PROMPTS[1])))  # waits
    engine.submit(greedy(tok.encode(PROMPTS[3])))  # waits: the queue is full
    with pytest.raises(Overloaded):
        engine.submit(greedy(tok.encode(PROMPTS[2])))
    engine.start()
    engine.shutdown(drain=True, timeout=30)
    assert [t for step in first for t in step.tokens] == alone(model, tok, tok.encode(PROMPTS[0]), 12)
    with pytest.raises(EngineStopped):
        engine.submit(greedy(tok.encode(PROMPTS[0])))


def test_prompt_longer_than_the_limit_is_refused(tok):
    from qwenkit.errors import ContextTooLong

    model = tiny_model("qwen2")
    with Engine(model, tok, max_model_len=16, block_size=4) as engine:
        with pytest.raises(ContextTooLong):
            list(engine.submit(greedy(list(range(20)))))




def test_shutdown_fails_requests_the_worker_never_picked_up(tok):
    engine = Engine(tiny_model("qwen2"), tok, block_size=4)  # never started: the request stays in the hand-over queue
    stream = engine.submit(greedy(tok.encode(PROMPTS[0])))
    engine.shutdown(drain=False)
    with pytest.raises(EngineStopped):
        list(stream)
