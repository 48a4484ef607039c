"""Putting compact weights into a model as it loads (`--quant auto|int8|int4|none`), then fusing projections.

- auto: quantized GGUF tensors stay compact. Q4_0, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K stay in the file's own blocks,
  run by the block kernels (qwenkit.quant.blocks) wherever a kernel variant is built (every install with a C
  compiler); the other quantized types, and all of them elsewhere, become int4 (4-bit types: Q4_0, Q4_1, Q4_K,
  Q3_K, Q2_K; exact) or int8. Float weights stay float.
- int8: every linear weight as int8.
- int4: every linear weight as int4 in groups of 32 (exact for 4-bit types; others re-quantized, with some loss).
- none: fp32 (or the requested dtype) everywhere: the reference path.

The int8 layout follows the kernel plan (qwenkit.quant.plan): where fbgemm runs int8 (x86), one scale per row (5-
to 8-bit GGUF values re-quantized per row); elsewhere, GGUF values kept exactly in groups (Q8_0/Q5_x/Q6_K map one
to one) for our compiled fp32 kernel.

Only dense linear weights are quantized (attention, MLP, shared expert, the head, and the embedding table); the MoE
router and stacked experts stay in float.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qwenkit.checkpoint import quants
from qwenkit.errors import BadCheckpoint, BadRequest
from qwenkit.quant.blocks import BlockLinear, BlockWeight, joined_bias
from qwenkit.quant.formats import Int4Grouped, Int8Grouped
from qwenkit.quant.from_gguf import CONVERTIBLE, convert, target_format
from qwenkit.quant.fuse import _as_int8, concat_rows
from qwenkit.quant.linear import QuantEmbedding, QuantLinear
from qwenkit.quant.plan import KernelPlan
from qwenkit.quant.quantize import quantize_int4, quantize_int8

QUANT_MODES = ("auto", "int8", "int4", "none")
FLOAT_GROUP = 32
EMBEDDING = "model.embed_tokens.weight"


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise BadRequest(f"quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    return mode


def is_quantizable(param: str) -> bool:
    if param.startswith("visual."):  # a vision tower's layers stay in float
        return False
    return param.endswith("_proj.weight") or param in ("lm_head.weight", EMBEDDING)


def _int8(weight: torch.Tensor) -> Int8Grouped:
    """int8 for float weights: one scale per row where a fused kernel runs it, else groups of 32."""
    return quantize_int8(weight, None if KernelPlan.detect().per_row_int8 else FLOAT_GROUP)


def _int4(weight: torch.Tensor) -> Int4Grouped:
    return quantize_int4(weight, FLOAT_GROUP)


def gguf_format(gguf, name: str, mode: str,
                plan: KernelPlan | None = None) -> BlockWeight | Int8Grouped | Int4Grouped | None:
    """The compact form of GGUF tensor `name` under `mode` and the kernel plan, or None to keep it in float."""
    plan = plan or KernelPlan.detect()
    t = gguf.tensors[name]
    if mode == "auto" and len(t.shape) == 2 and plan.block_kernel(t.qtype):
        n, k = t.shape
        blocks = torch.from_numpy(np.array(gguf.raw(name), dtype=np.uint8).reshape(n, -1))  # a copy: the map goes
        return BlockWeight(blocks, int(t.qtype), (n, k))
    native_type = t.qtype in CONVERTIBLE and len(t.shape) == 2
    if mode == "none" or (mode == "auto" and not native_type):
        return None
    four_bit = native_type and target_format(t.qtype)[0] is Int4Grouped
    exact = mode == "auto"  # auto keeps the file's values on every CPU: its groups, never a re-quantization
    if mode == "auto":
        mode = "int4" if four_bit else "int8"
    if mode == "int4":
        return convert(gguf.raw(name), t.qtype, t.shape) if four_bit else _requantize_rows(gguf, name, _int4)
    if native_type and (exact or not plan.per_row_int8):
        return _as_int8(convert(gguf.raw(name), t.qtype, t.shape))  # exact grouped int8
    return _requantize_rows(gguf, name, _int8)  # --quant int8 asked for fbgemm's one scale per row


def _requantize_rows(gguf, name: str, quantize: Callable) -> Int8Grouped | Int4Grouped:
    """Dequantize and re-quantize a tensor a slice of rows at a time (never a full fp32 copy of the tensor)."""
    t = gguf.tensors[name]
    n, k = t.shape
    raw, row_bytes = gguf.raw(name), t.nbytes // n
    step = max(1, (1 << 22) // k)
    parts = []
    for a in range(0, n, step):
        b = min(a + step, n)
        rows = quants.dequantize(np.asarray(raw[a * row_bytes : b * row_bytes]), t.qtype, (b - a) * k)
        parts.append(quantize(torch.from_numpy(rows).view(b - a, k)))
    return concat_rows(parts) if len(parts) > 1 else parts[0]


def float_format(weight: torch.Tensor, mode: str) -> Int8Grouped | Int4Grouped | None:
    if mode in ("none", "auto"):
        return None
    return _int8(weight) if mode == "int8" else _int4(weight)


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, attr = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def install(model, names: list[str], target_of, make_format: Callable[[str], object], source: str) -> list[str]:
    """Replace the linear layers (and embedding) that `make_format` quantizes; return the names left to fill."""
    remaining = []
    for name in names:
        target = target_of(name)
        if target is None or target.index or not is_quantizable(target.param):
            remaining.append(name)
            continue
        if target.param == "lm_head.weight" and model.lm_head is None:
            continue  # tied: the embedding's table serves as the head
        fmt = make_format(name)
        if fmt is None:
            remaining.append(name)
            continue
        module_name = target.param.rsplit(".", 1)[0]
        old = model.get_submodule(module_name)
        want = tuple(old.weight.shape)
        if tuple(fmt.shape) != want:
            raise BadCheckpoint(f"{source}: tensor {name} has shape {list(fmt.shape)}, expected {list(want)}")
        if target.param == EMBEDDING:
            table = _linear(fmt)
            if model.lm_head is None:
                model.lm_head = table  # tied head: one table for both ends
            model.model.embed_tokens = QuantEmbedding(table)
        else:
            _set_module(model, module_name, _linear(fmt, bias=old.bias))
    return remaining


def _linear(fmt, bias: torch.Tensor | None = None) -> QuantLinear | BlockLinear:
    return BlockLinear([fmt], bias=bias) if isinstance(fmt, BlockWeight) else QuantLinear(fmt, bias=bias)


def fuse(model) -> None:
    """The projections the model declares as packed (q/k/v, gate/up) as single ones where they are quantized:
    fewer, larger matrix-vector products. Layers of one kind are joined (block layers with block layers, grouped
    with grouped); a mix stays apart."""
    model.pack_projections(_joined_layer)


def _joined_layer(layers: list) -> QuantLinear | BlockLinear | None:
    if all(isinstance(layer, BlockLinear) for layer in layers):
        return BlockLinear.joined(layers)
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        return None
    return QuantLinear(_joined(layers), bias=joined_bias(layers))


def _joined(layers: list[QuantLinear]) -> Int8Grouped | Int4Grouped:
    """The layers' weights as one. Where int8 runs as one scale per row (fused kernels), a mix of formats is
    brought to that form, so the joined layer keeps the fast kernel."""
    formats = [layer.format for layer in layers]
    per_row = [layer.kind == "int8" and layer.group == layer.in_features for layer in layers]
    if KernelPlan.detect().per_row_int8 and any(per_row) and not all(per_row):
        formats = [f if row else quantize_int8(f.dequantize(), None) for f, row in zip(formats, per_row)]
    return concat_rows(formats)
