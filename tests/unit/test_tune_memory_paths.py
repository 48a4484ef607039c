"""Two ways to train with less waste, each checked against the plain path it replaces, on tiny random models:
packing a micro-batch into one row (attention kept inside each example, positions restarting) gives the padded
batch's loss and LoRA gradients; gradient checkpointing gives the same gradients while running each layer twice.
Tolerance 1e-5 absolute: the same fp32 math in another summation order (values here are ~1e-3..1)."""

from __future__ import annotations

import pytest
import torch

from qwenkit.tune.data import IGNORE, Example
from qwenkit.tune.lora import LoRAConfig, apply_lora, lora_layers
from qwenkit.tune.train import summed_loss
from tests.tiny_checkpoint import tiny_model

ARCHS = ["qwen2", "qwen2-tied-sliding", "qwen3-headdim", "qwen2_moe-shared"]


def examples(vocab: int, lengths=(7, 19, 4, 12), seed: int = 3) -> list[Example]:
    """Conversations of different lengths; the first part of each (the prompt) carries no loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, length in enumerate(lengths):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = 1 + n % 3
        out.append(Example(ids, [IGNORE] * cut + ids[cut:], line=n + 1))
    return out


def adapted(arch: str):
    model = tiny_model(arch)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0), seed=0)
    with torch.no_grad():  # B is zero at init: make the adapter matter
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def loss_and_grads(model, batch, pack: bool):
    model.zero_grad(set_to_none=True)
    loss, n = summed_loss(model, batch, pack)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_packed_micro_batch_gives_the_padded_loss_and_gradients(arch):
    model = adapted(arch)
    batch = examples(model.config.vocab_size)
    padded_loss, padded_n, padded = loss_and_grads(model, batch, pack=False)
    packed_loss, packed_n, packed = loss_and_grads(model, batch, pack=True)
    assert packed_n == padded_n > 0
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5 * max(1.0, abs(padded_loss.item()))
    assert padded.keys() == packed.keys() and padded
    assert max((padded[k] - packed[k]).abs().max().item() for k in padded) < 1e-5
    # without the per-example mask, the same row would mix the examples and give another loss
    from qwenkit.tune.train import collate_packed

    ids, labels, _ = collate_packed(batch)
    with torch.no_grad():
        mixed = model(ids, logits="none")
        assert not torch.allclose(mixed, model(ids, logits="none", segments=torch.tensor(
            [[n for n, e in enumerate(batch) for _ in e.input_ids]])), atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_moe-shared"])
def test_gradient_checkpointing_recomputes_each_layer_and_changes_nothing(arch):
    model = adapted(arch)
    batch = examples(model.config.vocab_size)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    plain_loss, _, plain = loss_and_grads(model, batch, pack=False)
    plain_calls = len(calls)
    calls.clear()
    model.gradient_checkpointing = True
    ckpt_loss, _, ckpt = loss_and_grads(model, batch, pack=False)
    for h in hooks:
        h.remove()
    assert plain_calls == len(model.model.layers) and len(calls) == 2 * plain_calls  # forward, then again in backward
    assert torch.equal(ckpt_loss, plain_loss)
    assert max((plain[k] - ckpt[k]).abs().max().item() for k in plain) < 1e-6


def test_a_bf16_base_trains_an_fp32_adapter_close_to_the_fp32_run(tiny_hf_path, tmp_path):
    """--dtype bf16: the frozen base in bf16 (half the memory, native bf16 matmuls), the adapter in fp32 as PEFT's
    autocast_adapter_dtype keeps it. Loss and gradients stay within bf16's precision of the fp32 run (bf16 keeps 8
    bits of mantissa: ~0.4% relative per rounding), and the saved adapter is fp32, usable on any base."""
    from safetensors.torch import load_file

    from qwenkit.checkpoint.loader import load_weights
    from qwenkit.tune.lora import merge_lora, save_adapter

    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_weights(tiny_hf_path, dtype)
        apply_lora(model, LoRAConfig(r=4, alpha=8.0), seed=0)
        with torch.no_grad():
            for m in lora_layers(model).values():
                m.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        runs[dtype] = (model, *loss_and_grads(model.train(), examples(model.config.vocab_size), pack=False))
    (_, loss32, _, g32), (m16, loss16, _, g16) = runs[torch.float32], runs[torch.bfloat16]
    assert abs(loss16.item() - loss32.item()) < 2e-2 * abs(loss32.item())
    scale = max(g.abs().max().item() for g in g32.values())
    assert max((g16[k] - g32[k]).abs().max().item() for k in g32) < 5e-2 * scale
    save_adapter(m16, LoRAConfig(r=4, alpha=8.0), tmp_path / "adapter")
    assert {t.dtype for t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values()} == {
        torch.float32}
    merge_lora(m16)  # folds into the bf16 weights
    assert m16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_resume_refuses_a_checkpoint_of_other_settings_and_names_them(tiny_hf_path, tmp_path):
    """A checkpoint continues only the run that wrote it: another base dtype (--dtype) or another flag would not
    give the uninterrupted result, and the error says which setting differs."""
    from qwenkit.checkpoint.loader import load_weights
    from qwenkit.errors import BadCheckpoint
    from qwenkit.tune.train import TrainConfig, Trainer

    def trainer(dtype, **cfg):
        model, _ = load_weights(tiny_hf_path, dtype)
        lora = LoRAConfig(r=4, alpha=8.0)
        apply_lora(model, lora, seed=0)
        data = examples(model.config.vocab_size)
        return Trainer(model, lora, TrainConfig(max_steps=2, batch_size=2, save_every=1, **cfg), data, None,
                       tmp_path / "out")

    trainer(torch.float32).run(progress=False)
    with pytest.raises(BadCheckpoint, match=r"other training settings \(base_dtype\)"):
        trainer(torch.bfloat16).run(resume=True, progress=False)
    with pytest.raises(BadCheckpoint, match=r"other training settings \(train.lr, train.pack\)"):
        trainer(torch.float32, lr=1e-3, pack=True).run(resume=True, progress=False)
    trainer(torch.float32).run(resume=True, progress=False)  # the same settings resume
