"""Our LoRA against PEFT on transformers' model of the same tiny random checkpoint.

Tolerances: forward logits within 1e-4 (the same bar as the model parity tests: both sides do fp32 math in a
different order, ~5e-6 apart here); loss within 1e-5; gradients of every lora_A / lora_B within 1e-5 absolute
(they are about 1e-3..1e-1 here, so a wrong scaling or a transposed matrix is far outside). A merged model's
logits within 1e-4 of base plus adapter (the merge changes the fp32 rounding order, ~1e-5 here).
"""

import pytest
import torch

from qwenkit.checkpoint.loader import load_weights
from qwenkit.tune.lora import LoRAConfig, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from tests.tiny_models import build_transformers_model, save_transformers_model

pytestmark = pytest.mark.peer
peft = pytest.importorskip("peft")

CFG = LoRAConfig(r=4, alpha=8.0)
ARCHS = ["qwen2", "qwen3-headdim", "qwen2_moe-shared"]


def batch(vocab: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt part without loss, as in assistant-only training
    return ids, labels


def loss_of(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def adapted_pair(reference, ours):
    """Our LoRA on `ours` and PEFT's on `reference` (the same weights), with one trained-looking adapter: B is zero
    at init, which would hide most mistakes. Returns PEFT's model."""
    apply_lora(ours, CFG, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for m in lora_layers(ours).values():
            m.lora_B.weight.normal_(0, 0.05, generator=g)
    wrapped = peft.get_peft_model(reference, peft.LoraConfig(r=CFG.r, lora_alpha=CFG.alpha, lora_dropout=0.0,
                                                             target_modules=CFG.target_modules))
    with torch.no_grad():
        for path, m in lora_layers(ours).items():
            theirs = wrapped.base_model.model.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)
    return wrapped


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_transformers_model(request.param, folder)
    ours, _ = load_weights(folder)
    return request.param, folder, adapted_pair(reference, ours), ours


def test_same_layers_are_adapted_as_peft(pair):
    _, _, wrapped, ours = pair
    theirs = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lora_layers(ours)) == theirs


def test_forward_loss_and_gradients_equal_peft(pair):
    _, _, wrapped, ours = pair
    ids, labels = batch(ours.config.vocab_size)
    wrapped.train(), ours.train()
    theirs_logits = wrapped(input_ids=ids).logits
    our_logits = ours(ids)
    assert (our_logits - theirs_logits).abs().max().item() < 1e-4
    ours_loss, theirs_loss = loss_of(our_logits, labels), loss_of(theirs_logits, labels)
    assert abs(ours_loss.item() - theirs_loss.item()) < 1e-5
    ours_loss.backward()
    theirs_loss.backward()
    worst = 0.0
    for path, m in lora_layers(ours).items():
        t = wrapped.base_model.model.get_submodule(path)
        for mine, other in ((m.lora_A.weight, t.lora_A["default"].weight), (m.lora_B.weight, t.lora_B["default"].weight)):
            worst = max(worst, (mine.grad - other.grad).abs().max().item())
    assert worst < 1e-5, f"largest gradient difference {worst:.2e}"
    # only the adapter trains
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, _ in ours.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_saved_adapter_loads_in_peft_and_back_in_qwenkit(pair, tmp_path):
    arch, folder, _, ours = pair
    save_adapter(ours, CFG, tmp_path / "adapter", base_model=str(folder))
    ids, _ = batch(ours.config.vocab_size, seed=3)
    ours.eval()
    with torch.no_grad():
        expected = ours(ids)
        fresh = build_transformers_model(arch)  # the same seeded weights as the saved checkpoint
        theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        assert (theirs(input_ids=ids).logits - expected).abs().max().item() < 1e-4
        again, _ = load_weights(folder)
        load_adapter(again, tmp_path / "adapter")
        assert torch.equal(again(ids), expected)


def test_merged_model_equals_base_plus_adapter(pair):
    _, folder, _, ours = pair
    merged, _ = load_weights(folder)
    apply_lora(merged, CFG, seed=0)
    with torch.no_grad():
        for path, m in lora_layers(merged).items():
            src = lora_layers(ours)[path]
            m.lora_A.weight.copy_(src.lora_A.weight)
            m.lora_B.weight.copy_(src.lora_B.weight)
    ids, _ = batch(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        expected = merged.eval()(ids)
        merge_lora(merged)
        assert not lora_layers(merged)
        # W x + B(A x) s and (W + B A s) x round differently in fp32: 1e-4, as for the logits above
        assert (merged(ids) - expected).abs().max().item() < 1e-4


def test_qwenkit_merge_writes_a_folder_transformers_loads_as_base_plus_adapter(pair, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    arch, folder, _, ours = pair
    save_adapter(ours, CFG, tmp_path / "adapter", base_model=str(folder))
    cmd = [sys.executable, "-m", "qwenkit", "merge", str(folder), str(tmp_path / "adapter"), "--out",
           str(tmp_path / "merged")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if arch.endswith("moe-shared"):  # per-expert tensors, as the released MoE checkpoints have them
        from safetensors import safe_open

        with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names
        assert not any(n.endswith("experts.gate_up_proj") for n in names)
    ids, _ = batch(ours.config.vocab_size, seed=9)
    with torch.no_grad():
        want = ours.eval()(ids)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert (merged(input_ids=ids).logits - want).abs().max().item() < 1e-4
        again, _ = load_weights(tmp_path / "merged")  # and qwenkit reads its own merge back
        assert (again.eval()(ids) - want).abs().max().item() < 1e-4


def transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_multi_turn_qwen3_loss_equals_peft_over_the_assistant_spans(tiny_qwen3_path):
    """A Qwen3 chat with tool calls and several assistant turns (the template reshapes earlier turns): the spans
    found in the whole rendering are every `<|im_start|>assistant\n` ... `<|im_end|>` of transformers' own
    rendering, and the loss over them is transformers+peft's."""
    import re

    from transformers import AutoTokenizer

    import qwenkit
    from qwenkit.tune.data import tokenize
    from qwenkit.tune.train import summed_loss
    from tests.e2e.test_tune import MULTI_TURN

    model = qwenkit.load(tiny_qwen3_path, quant="none", pull=False)
    messages, tools = MULTI_TURN["messages"], MULTI_TURN["tools"]
    example = tokenize(model, messages, tools, 1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_path)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert encoded.input_ids == example.input_ids
    spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.DOTALL)]
    assert len(spans) == 3
    labels = [t if any(s <= a and b <= e for s, e in spans) else -100
              for t, (a, b) in zip(encoded.input_ids, encoded.offset_mapping)]
    assert labels == example.labels
    wrapped = adapted_pair(transformers_model(tiny_qwen3_path), model.model)
    ours, count = summed_loss(model.model.train(), [example])
    theirs = wrapped.train()(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([labels])).loss
    assert abs(ours.item() / count - theirs.item()) < 1e-5


# PEFT adapters beyond LoRA on the decoder's Linear layers: LoRA on lm_head (a Linear) and embed_tokens (an
# Embedding: lora_embedding_A/B, saved with both layers' base weights), and modules_to_save (whole new weights).
# ensure_weight_tying: on a tied model, PEFT keeps the two ends one table (both LoRAs, or both saved modules).
OUTER_ADAPTERS = {
    "lora-head-embed": {"target_modules": ["q_proj", "lm_head", "embed_tokens"]},
    "lora-head": {"target_modules": ["q_proj", "lm_head"]},
    "lora-head-kept-tied": {"target_modules": ["q_proj", "lm_head"], "ensure_weight_tying": True},
    "saved-head": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "saved-embed": {"target_modules": ["v_proj"], "modules_to_save": ["embed_tokens"]},
    "saved-both-kept-tied": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head", "embed_tokens"],
                             "ensure_weight_tying": True},
}


@pytest.mark.parametrize("case", OUTER_ADAPTERS)
@pytest.mark.parametrize("base", ["tiny_hf_path", "tiny_qwen3_path"])  # untied head; tied (as Qwen2.5-0.5B's)
def test_merge_and_export_fold_head_and_embedding_adapters_as_peft_merges_them(request, tmp_path, base, case):
    """`qwenkit merge` and `export --adapter` give the logits of PEFT's merge_and_unload. On a tied model PEFT
    merges a LoRA on either end into the one shared table (so both ends change), and a saved module replaces that
    end alone (the two are untied) unless ensure_weight_tying kept them one."""
    import warnings

    import qwenkit
    from qwenkit.tune.export import export_gguf
    from qwenkit.tune.merge import merge_to_folder

    folder = request.getfixturevalue(base)
    with warnings.catch_warnings():  # PEFT's notes on tied layers and on saving the embedding layers
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(transformers_model(folder), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                 **OUTER_ADAPTERS[case]))
        with torch.no_grad():  # every trainable tensor moved off its initial value, as training would
            g = torch.Generator().manual_seed(2)
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        wrapped.save_pretrained(tmp_path / "adapter")
    ids, _ = batch(wrapped.config.vocab_size, seed=11)
    with torch.no_grad():
        want = wrapped.merge_and_unload().eval()(input_ids=ids).logits
        merge_to_folder(folder, tmp_path / "adapter", tmp_path / "merged")
        assert (transformers_model(tmp_path / "merged")(input_ids=ids).logits - want).abs().max().item() < 1e-4
        again, _ = load_weights(tmp_path / "merged")
        assert (again.eval()(ids) - want).abs().max().item() < 1e-4
        export_gguf(folder, tmp_path / "tuned.gguf", "f32", tmp_path / "adapter")
        exported = qwenkit.load(tmp_path / "tuned.gguf", quant="none", pull=False)
        assert (exported.model(ids) - want).abs().max().item() < 1e-4
