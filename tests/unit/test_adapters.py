"""LoRA adapters served over a loaded model (qwenkit.engine.adapters), on the tiny random Qwen2 checkpoint.

The reference is the training code's LoRA (qwenkit.tune.lora, itself checked against PEFT in
tests/peers/test_lora_parity.py): on the float model, serving an adapter gives the logits of the model wrapped by
tune's LoRA layers (1e-5: the same fp32 products in another order). On a quantized model, where q/k/v and gate/up
are fused, each projection's update lands in its own slice of the fused output. In the engine, requests of two
adapters and of the base model batched together produce exactly the tokens each produces alone, and the prefix
cache never hands one adapter's keys and values to another.
"""

from __future__ import annotations

import pytest
import torch

import qwenkit
from qwenkit.engine.adapters import AdaptedLinear, AdapterSet
from qwenkit.engine.engine import Engine
from qwenkit.errors import BadCheckpoint, BadRequest
from qwenkit.tune.lora import LoRAConfig, apply_lora, load_adapter, lora_layers, save_adapter
from tests.unit.test_engine import greedy, run_all

CFG = LoRAConfig(r=4, alpha=8.0)


def trained_adapter(base_path, dest, seed: int):
    """A LoRA folder as `qwenkit tune` writes it, with B non-zero (a fresh adapter would change nothing)."""
    model = qwenkit.load(base_path, pull=False, quant="none")
    apply_lora(model.model, CFG, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for m in lora_layers(model.model).values():
            m.lora_B.weight.normal_(0, 0.2, generator=g)
    return save_adapter(model.model, CFG, dest)


@pytest.fixture(scope="module")
def folders(tiny_hf_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [trained_adapter(tiny_hf_path, root / f"a{i}", seed=i) for i in (1, 2)]


@pytest.fixture(scope="module")
def ids(tiny_model):
    return torch.tensor([tiny_model.tokenizer.encode("Hello, world! The quick brown fox jumps over")])


def test_float_model_serving_an_adapter_equals_tunes_lora_layers(tiny_hf_path, folders, ids):
    served = qwenkit.load(tiny_hf_path, pull=False, quant="none")
    with torch.inference_mode():  # as below: the same kernels (without autograd, RMSNorm runs in C where built)
        base_logits = served.model(ids)
    adapters = AdapterSet(served.model)
    assert adapters.add("first", folders[0]) == 1
    with torch.inference_mode():
        with adapters.rows(1):
            got = served.model(ids)
        outside = served.model(ids)
    reference = qwenkit.load(tiny_hf_path, pull=False, quant="none")
    load_adapter(reference.model, folders[0])
    with torch.inference_mode():
        want = reference.model(ids)
    assert (want - base_logits).abs().max() > 0.5  # the adapter matters
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(outside, base_logits)  # outside rows(...) the base model, bit for bit


def test_fused_quantized_projections_get_each_their_slice(tiny_hf_path, folders):
    from safetensors.torch import load_file

    model = qwenkit.load(tiny_hf_path, pull=False, quant="int8")
    attn, mlp = model.model.model.layers[1].self_attn, model.model.model.layers[1].mlp
    assert attn.qkv_proj is not None and mlp.gate_up_proj is not None  # the loader fused them
    AdapterSet(model.model).add("first", folders[0])
    tensors = load_file(str(folders[0] / "adapter_model.safetensors"))

    def delta(path: str, x: torch.Tensor) -> torch.Tensor:
        a = tensors[f"base_model.model.{path}.lora_A.weight"]
        b = tensors[f"base_model.model.{path}.lora_B.weight"]
        return (x @ a.t()) @ b.t() * CFG.scaling

    x = torch.randn(1, 5, attn.qkv_proj.in_features, generator=torch.Generator().manual_seed(0))
    prefix = "model.layers.1"
    for module, parts in ((attn.qkv_proj, [f"{prefix}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]),
                          (mlp.gate_up_proj, [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"])):
        assert isinstance(module, AdaptedLinear)
        with torch.inference_mode():
            with AdapterSet.rows(torch.tensor([1, 1, 0, 1, 1])):
                got = module(x)
            base = module.base(x)
        want = base + torch.cat([delta(p, x) for p in parts], dim=-1)
        want[:, 2] = base[:, 2]  # the row of id 0 is the base model's
        assert (got - want).abs().max() < 1e-5


def test_quantized_model_with_an_adapter_tracks_the_float_one(tiny_hf_path, folders, ids):
    quant = qwenkit.load(tiny_hf_path, pull=False, quant="int8")
    adapters = AdapterSet(quant.model)
    adapters.add("first", folders[0])
    float_lora = qwenkit.load(tiny_hf_path, pull=False, quant="none")
    with torch.inference_mode():
        plain = float_lora.model(ids)
        load_adapter(float_lora.model, folders[0])
        want = float_lora.model(ids)
        with adapters.rows(1):
            got = quant.model(ids)
    # int8 weights move logits a little; the adapter moves them a lot more
    assert (got - want).abs().max() < 0.2 * (want - plain).abs().max()


@pytest.mark.parametrize("quant", ["int8", "none"])
def test_engine_batches_two_adapters_and_the_base_exactly(tiny_hf_path, folders, quant):
    model = qwenkit.load(tiny_hf_path, pull=False, quant=quant)
    tok = model.tokenizer
    adapters = AdapterSet(model.model)
    a1, a2 = adapters.add("one", folders[0]), adapters.add("two", folders[1])
    prompts = ["Hello, world!", "The quick brown fox jumps over the lazy dog", "A", "Hello, world! The"]
    jobs = [(p, a) for p in prompts for a in (0, a1, a2)]

    def requests():
        out = []
        for p, a in jobs:
            r = greedy(tok.encode(p), max_new=10)
            r.adapter = a
            out.append(r)
        return out

    with Engine(model.model, tok, max_batch=6, block_size=4, prefill_chunk=16, adapters=adapters) as engine:
        one_at_a_time = [run_all(engine, [r])[0] for r in requests()]
        assert one_at_a_time[0] != one_at_a_time[1] != one_at_a_time[2]  # each adapter changes the answer
        assert run_all(engine, requests()) == one_at_a_time  # all twelve in one batch
        assert run_all(engine, requests()) == one_at_a_time  # again, now from the prefix cache
    # each alone, its prompt in one pass, agrees too
    with Engine(model.model, tok, max_batch=1, prefill_chunk=4096, adapters=adapters) as engine:
        assert [run_all(engine, [r])[0] for r in requests()] == one_at_a_time


def test_the_prefix_cache_keeps_adapters_apart(tiny_hf_path, folders):
    model = qwenkit.load(tiny_hf_path, pull=False, quant="int8")
    tok = model.tokenizer
    adapters = AdapterSet(model.model)
    ident = adapters.add("one", folders[0])
    prompt = tok.encode("The quick brown fox jumps over the lazy dog, and again")
    with Engine(model.model, tok, max_batch=2, block_size=4, adapters=adapters) as engine:
        base = run_all(engine, [greedy(prompt, max_new=6)])
        hits = engine.stats().prefix_cache_hits
        adapted = greedy(prompt, max_new=6)
        adapted.adapter = ident
        first = run_all(engine, [adapted])
        assert engine.stats().prefix_cache_hits == hits  # the base model's blocks are not this adapter's
        assert run_all(engine, [adapted]) == first and engine.stats().prefix_cache_hits > hits
        assert first != base
        unknown = greedy(prompt, max_new=6)
        unknown.adapter = ident + 1
        with pytest.raises(BadRequest, match="no adapter with id 2"):  # not the base model's answer
            engine.submit(unknown)
    with Engine(model.model, tok, max_batch=2, block_size=4) as engine:  # an engine with no adapters at all
        with pytest.raises(BadRequest, match="no adapter with id 1"):
            engine.submit(adapted)


def test_adapters_that_do_not_fit_are_refused(tiny_hf_path, tiny_qwen3_path, folders, tmp_path):
    model = qwenkit.load(tiny_hf_path, pull=False, quant="int8")
    adapters = AdapterSet(model.model)
    with pytest.raises(BadCheckpoint, match="adapter_config.json"):
        adapters.add("missing", tmp_path / "nothing")
    other = trained_adapter(tiny_qwen3_path, tmp_path / "qwen3", seed=3)  # another architecture's shapes
    with pytest.raises(BadCheckpoint, match="do not fit|not a projection|not a module"):
        adapters.add("qwen3", other)
    adapters.add("one", folders[0])
    with pytest.raises(BadRequest, match="already loaded"):
        adapters.add("one", folders[1])
    with pytest.raises(BadRequest, match="no adapter named 'nope'; loaded: one"):
        adapters.id_of("nope")
    with pytest.raises(BadCheckpoint, match="lm_head cannot be served per request"):
        adapters.add("head", edited_adapter(folders[0], tmp_path / "head", head=model.model.lm_head))
    with pytest.raises(BadCheckpoint, match="rank 4 but adapter_config.json says r=8"):
        adapters.add("rank", edited_adapter(folders[0], tmp_path / "rank", r=8))
    assert list(adapters.names) == ["one"]  # the refused ones changed nothing


def edited_adapter(folder, dest, head=None, r=None):
    """A copy of an adapter folder with an lm_head pair added, or another r in its config."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    if head is not None:
        tensors = load_file(str(dest / "adapter_model.safetensors"))
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(CFG.r, head.in_features)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(head.out_features, CFG.r)
        save_file(tensors, str(dest / "adapter_model.safetensors"))
    if r is not None:
        config = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps(dict(config, r=r)))
    return dest
