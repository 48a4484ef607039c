"""A decode step's decoder layers on the C kernels with almost no Python between them.

A decode step of a small model is mostly a string of short kernel calls: per layer two norms, four block matmuls
and the attention, each wrapped in a module call, a few checks and a tensor allocation. On Qwen3-0.6B that Python
costs about a tenth of the step, as much as llama.cpp's whole lead on some files. Here the front of each layer
(input norm, q/k/v, attention over the paged pool, output projection and residual, post-attention norm, gate/up)
is one C call (qwenkit.kernels.layer); its SiLU, down projection and residual stay the modules' own.

The C function calls the same kernels the modules call for these rows, in the same order, and the additions are
the same single-precision additions: a fused step gives the modules' numbers bit for bit
(tests/unit/test_fused_layers.py). So it runs only where the modules would run exactly those kernels:
- every row of the step is a generated token (the block layers' row kernels; no prompt rows);
- the layer is dense (not MoE) with its q/k/v and gate/up joined, and all four projections are BlockLinear
  (GGUF blocks on the C kernels; an adapter's wrapper or any other weight form is left to the modules);
- float32 activations and norm weights, no autograd, a float16 or float32 pool;
- no forward hooks on the layer's modules (a profiler's labels, say), which a fused call would skip.
Anything else returns None and the modules run.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from qwenkit.kernels import attention as attention_kernels
from qwenkit.kernels.attention import block_size_shift, float32_contiguous
from qwenkit.kernels.blocks import Parts
from qwenkit.kernels.layer import LayerArgs, StepArgs, layer_front
from qwenkit.model.qwen import MLP, DecoderLayer
from qwenkit.quant.blocks import BlockLinear


class _Sources(NamedTuple):
    """What a layer's plan is built from: checked by identity every step, so a replaced module (an adapter's
    wrapper), weight or kernel buffer makes a new plan."""

    qkv_proj: BlockLinear
    o_proj: BlockLinear
    gate_up_proj: BlockLinear
    down_proj: BlockLinear
    qkv: Parts  # the kernel parts of the three the C call runs (their ctypes arrays are what it reads)
    o: Parts
    gate_up: Parts
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    o_bias: torch.Tensor | None


@dataclass
class _Plan:
    """One layer's C description."""

    sources: _Sources
    args: LayerArgs
    submodules: tuple[torch.nn.Module, ...]  # whose forward hooks would be skipped
    keep: tuple  # the float32 copies (where one was needed) and pools whose addresses args holds


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedLayers:
    """The fused decoder layers over one KV pool: a plan per layer, built on first use."""

    def __init__(self, pool):
        self.pool = pool
        self._plans: dict[int, _Plan] = {}

    @staticmethod
    def _sources(layer: DecoderLayer) -> _Sources | None:
        """None where the layer cannot run fused."""
        attn, mlp = layer.self_attn, layer.mlp
        if type(mlp) is not MLP:
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(type(m) is not BlockLinear for m in linears):
            return None
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        norms = (norm_in.weight, norm_post.weight)
        if any(w.dtype != torch.float32 for w in norms) or norm_in.eps != norm_post.eps:  # the C call takes one eps
            return None
        qk = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
        return _Sources(*linears, *(m._parts() for m in linears[:3]), *norms, *qk, attn.qkv_proj.bias,
                        attn.o_proj.bias)

    def _plan(self, layer: DecoderLayer) -> _Plan | None:
        sources = self._sources(layer)
        if sources is None:
            return None
        plan = self._plans.get(id(layer))
        if plan is not None and all(map(operator.is_, plan.sources, sources)):
            return plan
        attn = layer.self_attn
        k_pool, v_pool = self.pool.k[attn.layer], self.pool.v[attn.layer]
        if k_pool.dtype not in attention_kernels.POOL_DTYPES:
            return None
        f32 = [float32_contiguous(t) for t in (sources.qkv_bias, sources.o_bias, sources.input_norm, sources.post_norm,
                                 sources.q_norm, sources.k_norm)]
        qkv_bias, o_bias, input_norm, post_norm, q_norm, k_norm = map(_ptr, f32)
        args = LayerArgs(
            hidden=sources.o_proj.out_features, heads=attn.n_heads, kv_heads=attn.n_kv, head_dim=attn.head_dim,
            inter2=sources.gate_up_proj.out_features, qkv=sources.qkv.array, o=sources.o.array,
            gate_up=sources.gate_up.array, n_qkv=len(sources.qkv.blocks), n_o=len(sources.o.blocks),
            n_gate_up=len(sources.gate_up.blocks), qkv_bias=qkv_bias, o_bias=o_bias, input_norm=input_norm,
            post_norm=post_norm, q_norm=q_norm, k_norm=k_norm, eps=layer.input_layernorm.eps,
            qk_eps=attn.q_norm.eps if attn.q_norm is not None else 0.0, scale=attn.head_dim**-0.5,
            window=attn.window or 0, k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr(),
            half=int(k_pool.dtype == torch.float16), n_blocks=k_pool.shape[0],
            block_shift=block_size_shift(k_pool.shape[2]))
        submodules = tuple(m for m in layer.modules() if m is not layer)
        plan = self._plans[id(layer)] = _Plan(sources, args, submodules, (*f32, k_pool, v_pool))
        return plan

    def run(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            step: StepArgs) -> torch.Tensor | None:
        """The layer's output for x [1, N, hidden], or None where the modules must run it (see the module doc)."""
        if x.dtype != torch.float32 or torch.is_grad_enabled():
            return None
        plan = self._plan(layer)
        if plan is None or _hooked(plan.submodules):
            return None
        n, hidden = x.shape[1], x.shape[2]
        out = x.reshape(n, hidden).clone(memory_format=torch.contiguous_format)  # becomes x + attention, in place
        gate_up = torch.empty((1, n, plan.args.inter2), dtype=torch.float32)
        layer_front(plan.args, step, out, gate_up)
        gate, up = gate_up.split(layer.mlp.split, dim=-1)
        return out.view(1, n, hidden) + plan.sources.down_proj(F.silu(gate) * up)


def _hooked(modules: tuple[torch.nn.Module, ...]) -> bool:
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def step_args(slots: attention_kernels.Slots, cos: torch.Tensor, sin: torch.Tensor) -> tuple[StepArgs, tuple]:
    """The step's rows for the C layers: rotary tables [N, head_dim] float32 and the pool slots. -> (the ctypes
    struct, the tensors it points into, to be kept alive with it)."""
    n = slots.write.numel()
    cos, sin = float32_contiguous(cos.reshape(n, -1)), float32_contiguous(sin.reshape(n, -1))
    args = StepArgs(rows=n, cos=cos.data_ptr(), sin=sin.data_ptr(), write_slot=slots.write.data_ptr(),
                    ctx=slots.context.data_ptr(), row_ctx=slots.starts.data_ptr(), row_len=slots.lengths.data_ptr())
    return args, (cos, sin, slots)
