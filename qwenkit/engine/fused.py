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

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from qwenkit.kernels import attention as attention_kernels
from qwenkit.kernels.layer import LayerArgs, StepArgs, layer_front
from qwenkit.model.qwen import MLP, DecoderLayer
from qwenkit.quant.blocks import BlockLinear


@dataclass
class _Plan:
    """One layer's C description, and what it was built from (checked by identity every step)."""

    sources: tuple  # also keeps the kernel parts (their ctypes arrays) alive
    args: LayerArgs
    keep: tuple  # the other tensors whose addresses args holds


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedLayers:
    """The fused decoder layers over one KV pool: a plan per layer, built on first use."""

    def __init__(self, pool):
        self.pool = pool
        self._plans: dict[int, _Plan | None] = {}

    @staticmethod
    def _sources(layer: DecoderLayer) -> tuple | None:
        """The modules and tensors a plan is built from, or None where the layer cannot run fused."""
        attn, mlp = layer.self_attn, layer.mlp
        if type(mlp) is not MLP:
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(type(m) is not BlockLinear for m in linears):
            return None
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(w.dtype != torch.float32 for w in norms):
            return None
        qk = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
        return (*linears, *(m._parts() for m in linears[:3]), *norms, *qk, attn.qkv_proj.bias, attn.o_proj.bias)

    def _plan(self, layer: DecoderLayer) -> _Plan | None:
        sources = self._sources(layer)
        if sources is None:
            return None
        plan = self._plans.get(id(layer))
        if plan is not None and len(plan.sources) == len(sources) and all(map(operator.is_, plan.sources, sources)):
            return plan
        attn, mlp = layer.self_attn, layer.mlp
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        k_pool, v_pool = self.pool.k[attn.layer], self.pool.v[attn.layer]
        if k_pool.dtype not in attention_kernels.POOL_DTYPES or norm_in.eps != norm_post.eps:
            return None
        qkv, o, gate_up = sources[4:7]
        tensors = [_f32(t) for t in (attn.qkv_proj.bias, attn.o_proj.bias, norm_in.weight, norm_post.weight,
                                     *sources[9:11])]
        args = LayerArgs(
            hidden=attn.o_proj.out_features, heads=attn.n_heads, kv_heads=attn.n_kv, head_dim=attn.head_dim,
            inter2=mlp.gate_up_proj.out_features, qkv=qkv.array, o=o.array, gate_up=gate_up.array,
            n_qkv=len(qkv.blocks), n_o=len(o.blocks), n_gate_up=len(gate_up.blocks),
            qkv_bias=_ptr(tensors[0]), o_bias=_ptr(tensors[1]), input_norm=_ptr(tensors[2]),
            post_norm=_ptr(tensors[3]), q_norm=_ptr(tensors[4]), k_norm=_ptr(tensors[5]), eps=norm_in.eps,
            qk_eps=attn.q_norm.eps if attn.q_norm is not None else 0.0, scale=attn.head_dim**-0.5,
            window=attn.window or 0, k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr(),
            half=int(k_pool.dtype == torch.float16), n_slots=k_pool.shape[1])
        plan = self._plans[id(layer)] = _Plan(sources, args, (*tensors, k_pool, v_pool))
        return plan

    def run(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            step: StepArgs) -> torch.Tensor | None:
        """The layer's output for x [1, N, hidden], or None where the modules must run it (see the module doc)."""
        if x.dtype != torch.float32 or torch.is_grad_enabled() or _hooked(layer):
            return None
        plan = self._plan(layer)
        if plan is None:
            return None
        n, hidden = x.shape[1], x.shape[2]
        out = x.reshape(n, hidden).clone()  # becomes x + attention, in place
        gate_up = torch.empty((1, n, plan.args.inter2), dtype=torch.float32)
        layer_front(plan.args, step, out, gate_up)
        gate, up = gate_up.split(layer.mlp.split, dim=-1)
        return out.view(1, n, hidden) + layer.mlp.down_proj(F.silu(gate) * up)


def _hooked(layer: DecoderLayer) -> bool:
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules() if m is not layer)


def step_args(slots: attention_kernels.Slots, cos: torch.Tensor, sin: torch.Tensor) -> tuple[StepArgs, tuple]:
    """The step's rows for the C layers: rotary tables [N, head_dim] float32 and the pool slots. -> (the ctypes
    struct, the tensors it points into, to be kept alive with it)."""
    n = slots.write.numel()
    cos, sin = cos.reshape(n, -1).float().contiguous(), sin.reshape(n, -1).float().contiguous()
    args = StepArgs(rows=n, cos=cos.data_ptr(), sin=sin.data_ptr(), write_slot=slots.write.data_ptr(),
                    ctx=slots.context.data_ptr(), row_ctx=slots.starts.data_ptr(), row_len=slots.lengths.data_ptr())
    return args, (cos, sin, slots)
