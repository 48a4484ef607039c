"""Decode steps' fused decoder layers (qwenkit.engine.fused, csrc/layer.c) against the layers' own modules.

The fused path promises the modules' numbers bit for bit: the same kernels in the same order. So the check is
exact: the same seeded samples and the same logprobs (float equality, not a tolerance), for batches of several
decoding sequences, on GGUF block weights of each shape of layer it takes (Qwen2 with q/k/v bias, Qwen3 with q/k
norms and head_dim unequal to hidden/heads, a sliding-window layer, a float16 and a float32 KV pool). And where it
must not run (MoE layers, float weights, prompt rows, a forward hook), the modules run.
"""

from __future__ import annotations

import pytest
import torch

from qwenkit.engine import fused
from qwenkit.engine.engine import Engine, GenerationRequest
from qwenkit.engine.sampling import SamplingParams
from qwenkit.kernels.library import available
from tests.tiny_checkpoint import tiny_gguf

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not available(), reason="the CPU kernels are not built for this machine")

PROMPTS = ["Hello, world! The quick brown fox", "A", "1 2 3 4 5 6 7 8 9 10", "The lazy dog sleeps"]


@pytest.fixture
def counted(monkeypatch):
    """Counts the layers the fused path ran; `off()` makes every layer run on its modules."""
    calls = {"fused": 0}
    run = fused.FusedLayers.run

    def counting(self, *args):
        out = run(self, *args)
        calls["fused"] += out is not None
        return out

    monkeypatch.setattr(fused.FusedLayers, "run", counting)
    calls["off"] = lambda: monkeypatch.setattr(fused.FusedLayers, "run", lambda self, *args: None)
    return calls


def generate(model, tok, kv_dtype) -> list[tuple[list[int], list[float]]]:
    """Four requests decoding together, seeded samples with logprobs: (tokens, logprobs) of each."""
    with Engine(model, tok, max_batch=4, block_size=4, prefill_chunk=8, kv_dtype=kv_dtype) as engine:
        streams = [engine.submit(GenerationRequest(tok.encode(p), SamplingParams(temperature=0.8, seed=i,
                                                                                  logprobs=True), 16))
                   for i, p in enumerate(PROMPTS)]
        out = []
        for s in streams:
            steps = list(s)
            out.append(([t for st in steps for t in st.tokens], [lp.logprob for st in steps for lp in st.logprobs]))
        return out


def load(tmp_path, arch: str, qtype: str):
    import qwenkit

    path = tiny_gguf(tmp_path, arch, qtype=gguf.GGMLQuantizationType[qtype])
    return qwenkit.load(path, pull=False)


@pytest.mark.parametrize("arch,qtype", [("qwen2", "Q8_0"), ("qwen2", "Q4_0"), ("qwen3-headdim", "Q8_0"),
                                        ("qwen2-tied-sliding", "Q4_0")])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_fused_decode_steps_give_the_modules_numbers_exactly(arch, qtype, kv_dtype, tmp_path, counted):
    m = load(tmp_path, arch, qtype)
    with_fused = generate(m.model, m.tokenizer, kv_dtype)
    assert counted["fused"] > 0, "the fused path did not run"
    counted["off"]()
    assert generate(m.model, m.tokenizer, kv_dtype) == with_fused


def test_layers_it_cannot_take_run_on_their_modules(tmp_path, counted, tiny_model):
    moe = load(tmp_path, "qwen3_moe", "Q8_0")  # MoE layers
    generate(moe.model, moe.tokenizer, torch.float16)
    generate(tiny_model.model, tiny_model.tokenizer, torch.float32)  # float weights
    assert counted["fused"] == 0


def test_a_forward_hook_sends_the_layer_to_its_modules(tmp_path, counted):
    m = load(tmp_path, "qwen2", "Q8_0")
    seen = []
    hook = m.model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    try:
        generate(m.model, m.tokenizer, torch.float16)
    finally:
        hook.remove()
    assert counted["fused"] > 0 and seen  # the other layers fused; the hooked one ran its modules, every step
    layers = len(m.model.model.layers)
    assert counted["fused"] % (layers - 1) == 0 and len(seen) >= counted["fused"] // (layers - 1)
