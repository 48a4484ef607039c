"""Tensor names: llama.cpp's GGUF names <-> the Hugging Face names our model uses, and where each tensor lands.

Most tensors map one to one. Stacked MoE experts are the exception: GGUF keeps gate and up as two [E, I, H] tensors,
and per-expert Hugging Face checkpoints keep one [I, H] tensor per expert, while the model holds one fused
gate_up_proj [E, 2I, H]. A Target says which parameter and which slice of it a checkpoint tensor fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenkit.model.config import ModelConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Target:
    param: str  # parameter name in QwenForCausalLM.state_dict()
    index: tuple = ()  # indices/slices into that parameter; () means the whole tensor


_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def gguf_target(name: str, config: ModelConfig) -> Target | None:
    """Where GGUF tensor `name` goes in our model, or None if it is not a tensor we know."""
    if name in _GGUF_TOP:
        return Target(_GGUF_TOP[name])
    m = _BLOCK.match(name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{layer}."
    if rest in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
        i = config.moe_intermediate_size
        half = slice(0, i) if rest.startswith("ffn_gate") else slice(i, 2 * i)
        return Target(prefix + "mlp.experts.gate_up_proj", (slice(None), half))
    hf = _GGUF_BLOCK.get(rest)
    return Target(prefix + hf) if hf else None


# Qwen3-VL's checkpoints (and transformers' own layout for every VL model) nest both halves under model.
_HF_NESTED = (("model.language_model.", "model."), ("model.visual.", "visual."))


def released_name(name: str, family: str | None) -> str:
    """The name a parameter has in its family's released checkpoints: Qwen3-VL nests both halves under model.
    (the inverse of what hf_target reads); every other family keeps our names."""
    if family == "qwen3_vl":
        for nested, ours in _HF_NESTED:
            if name.startswith(ours):
                return nested + name[len(ours):]
    return name


def hf_target(name: str, config: ModelConfig) -> Target | None:
    """Where Hugging Face tensor `name` goes: the same name, except per-expert tensors go into the stacked ones
    and a VL checkpoint's nested halves go to the decoder (model.) and the vision tower (visual.)."""
    for nested, ours in _HF_NESTED:
        if name.startswith(nested):
            name = ours + name[len(nested):]
    m = _HF_EXPERT.match(name)
    if not m:
        return Target(name)
    stem, expert, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind == "down":
        return Target(f"{stem}.down_proj", (expert,))
    i = config.moe_intermediate_size
    half = slice(0, i) if kind == "gate" else slice(i, 2 * i)
    return Target(f"{stem}.gate_up_proj", (expert, half))


def hf_tensors(name: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors a model parameter is written as (`qwenkit merge`): itself, except the stacked
    experts, which become the per-expert tensors of the released MoE checkpoints (what hf_target reads back)."""
    m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up|down)_proj$", name)
    if not m:
        return {name: tensor}
    stem, i = m.group(1), config.moe_intermediate_size
    out = {}
    for e in range(tensor.shape[0]):
        if m.group(2) == "down":
            out[f"{stem}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[f"{stem}.{e}.gate_proj.weight"] = tensor[e, :i].contiguous()
            out[f"{stem}.{e}.up_proj.weight"] = tensor[e, i:].contiguous()
    return out


def hf_to_gguf(name: str) -> list[str]:
    """The GGUF tensor names a model parameter is written as (GGUF export).

    The fused expert gate_up_proj [E, 2I, H] becomes llama.cpp's two tensors, gate then up, split in half on dim 1.
    """
    for gguf, hf in _GGUF_TOP.items():
        if hf == name:
            return [gguf]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if not m:
        raise KeyError(name)
    layer, rest = m.group(1), m.group(2)
    if rest == "mlp.experts.gate_up_proj":
        return [f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight"]
    for gguf, hf in _GGUF_BLOCK.items():
        if hf == rest:
            return [f"blk.{layer}.{gguf}"]
    raise KeyError(name)
