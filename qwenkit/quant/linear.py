"""Linear and embedding layers over the compact weight formats (Int8Grouped, Int4Grouped).

Which kernel runs depends on the format, the kernel plan (qwenkit.quant.plan) and the rows: inside the engine, tokens
the model generated take the row kernels and prompt tokens the matrix kernel (decode_rows); elsewhere (scoring,
training) few rows take the row kernels and many the matrix kernel.
- row kernels (up to GEMV_MAX_ROWS rows a call, or FUSED_MAX_ROWS for the fused kernels):
  - int8 with one scale per row, on x86: fbgemm's dynamic int8 linear on its own packed copy of the weight (42-52
    ms per decode step of the default model against 57-75 ms with the next choice, for ~0.5 GB more memory).
    fbgemm quantizes a whole batch of activations with one range; inside batch_invariant() (the serving engine) we
    map each row onto [-1, 1] first (_fbgemm_per_row), so a request's result does not depend on its batch;
  - int4 in rows of 64 with groups of 32-256, on CPUs with native bf16: PyTorch's tinygemm kernel;
  - everything else: our compiled grouped kernels, in fp32.
- the matrix kernel (prompt chunks): the weight is dequantized once per call, a few MB per layer, and multiplied with
  the regular matrix kernel, in bf16 where the CPU has it (AMX / AVX512-BF16 make that several times faster), else
  fp32.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit._scoped import scoped
from qwenkit.quant import kernels, tinygemm
from qwenkit.quant.formats import Int4Grouped, Int8Grouped
from qwenkit.quant.plan import KernelPlan

GEMV_MAX_ROWS = 4  # up to this many activation rows, our compiled kernels read the packed weights directly
# Up to this many rows, PyTorch's fused int8/int4 kernels, and fbgemm within batch_invariant(), compute each row
# alone: a served request gets the same numbers whatever it is batched with (more generated rows go in pieces of
# this many). Prompt tokens take the matrix kernel instead: faster for the fused kernels, whose cost grows with the
# rows, and more precise than 8-bit activations (+0.4% perplexity against +0.9% for the default model).
FUSED_MAX_ROWS = 64


# PyTorch's fp32 matrix kernel takes other code paths below this many rows, whose results differ in the last bits:
# prompt rows are padded to it, so a prompt token's numbers do not depend on how many share its chunk.
MIN_MATRIX_ROWS = 16

_mode = threading.local()


def decode_rows(n: int) -> contextlib.AbstractContextManager[None]:
    """Within this block (in this thread), the first n activation rows of every quantized layer call are tokens
    the model generated (decode steps, and a preempted request's answer recomputed) and run on the row kernels,
    each row alone; the rest are prompt tokens and run on the dequantized weight and the matrix kernel. So every
    token takes the same kernel whatever it is batched or chunked with: the serving engine's batch invariance, with
    prompt chunks of any length at the matrix kernel's speed."""
    return scoped(_mode, "decode_rows", n)


def rows_then_matrix(x: torch.Tensor, row_limit: int, rows, matrix) -> torch.Tensor:
    """x [M, K] -> [M, N]: the leading rows through `rows`, in pieces of at most row_limit (up to which it computes
    each row alone), and the others through `matrix` (padded to MIN_MATRIX_ROWS). Inside decode_rows(n) the split
    is n; elsewhere every row takes `rows` when M <= row_limit, and none does otherwise."""
    split = getattr(_mode, "decode_rows", None)
    m = x.shape[0]
    if split is None:
        split = m if m <= row_limit else 0
    if split >= m and m <= row_limit:  # a decode step: every row on the row kernel, in one call
        return rows(x)
    split = min(split, m)
    parts = [rows(x[i : min(i + row_limit, split)]) for i in range(0, split, row_limit)]
    if split < m:
        prompt = x[split:]
        if prompt.shape[0] < MIN_MATRIX_ROWS:
            prompt = torch.cat([prompt, prompt.new_zeros(MIN_MATRIX_ROWS - prompt.shape[0], x.shape[1])])
        parts.append(matrix(prompt)[: m - split])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def batch_invariant() -> contextlib.AbstractContextManager[None]:
    """Within this block (in this thread), every row of a batch up to FUSED_MAX_ROWS gets exactly the result it would
    get alone. The engine runs its steps in it: fbgemm then quantizes each row on its own range (about a third of
    its decode speed, against its plain matrix-vector path)."""
    return scoped(_mode, "on", True, default=False)


def batch_invariant_enabled() -> bool:
    return getattr(_mode, "on", False)


class QuantLinear(nn.Module):
    def __init__(self, weight: Int8Grouped | Int4Grouped, bias: torch.Tensor | None = None,
                 plan: KernelPlan | None = None):
        super().__init__()
        plan = plan or KernelPlan.detect()
        n, k = weight.shape
        self.out_features, self.in_features, self.group = n, k, weight.group
        self.matrix_dtype, self.vnni = plan.matrix_dtype, plan.vnni
        self.packed = None  # fbgemm's packed weight, when that engine runs this layer's decode
        if isinstance(weight, Int8Grouped):
            self.kind, data = "int8", weight.q
            self.fused_kernel = False
            if plan.int8_kernel(per_row=weight.group == k and weight.offset is None) == "fbgemm":
                self.packed = _fbgemm_pack(weight)
                self.register_buffer("row_sums", weight.q.sum(dim=1, dtype=torch.float32) * weight.scale[:, 0])
        else:
            self.kind = "int4"
            self.fused_kernel = plan.int4_kernel(n, k, weight.group) == "tinygemm"
            data = tinygemm.pack(weight.unpack()) if self.fused_kernel else weight.packed
        self.register_buffer("data", data)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        if self.fused_kernel:
            self.register_buffer("kernel_scale", tinygemm.scales_and_zeros(weight.scale, weight.offset))
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    # ---- the weight in other forms -----------------------------------------------------------------------------
    def values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The stored integers (int8, or uint8 0..15 for int4) of all rows or of `rows`, [R, K]."""
        if self.kind == "int8":
            return self.data if rows is None else self.data[rows]
        if self.fused_kernel:
            return tinygemm.unpack(self.data, self.in_features) if rows is None else tinygemm.unpack_rows(
                self.data, rows, self.in_features
            )
        fmt = Int4Grouped(self.data if rows is None else self.data[rows], self._pick(self.scale, rows),
                          self._pick(self.offset, rows), self.group)
        return fmt.unpack()

    @staticmethod
    def _pick(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or rows is None else t[rows]

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        q = self.values(rows)
        n_rows, groups = q.shape[0], self.in_features // self.group
        w = q.view(n_rows, groups, self.group).to(dtype) * self._pick(self.scale, rows).to(dtype).unsqueeze(-1)
        if self.offset is not None:
            w = w + self._pick(self.offset, rows).to(dtype).unsqueeze(-1)
        return w.view(n_rows, self.in_features)

    @property
    def format(self) -> Int8Grouped | Int4Grouped:
        if self.kind == "int8":
            return Int8Grouped(self.data, self.scale, self.offset, self.group)
        if self.fused_kernel:
            return Int4Grouped.from_values(self.values(), self.scale, self.offset, self.group)
        return Int4Grouped(self.data, self.scale, self.offset, self.group)

    @property
    def nbytes(self) -> int:
        """Bytes of weight data (an fbgemm packed copy counted as one byte per weight)."""
        packed = self.out_features * self.in_features if self.packed is not None else 0
        return packed + sum(b.nbytes for b in self.buffers())

    # ---- compute -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        invariant = batch_invariant_enabled()
        if self.packed is not None:
            fast_rows = FUSED_MAX_ROWS if invariant else GEMV_MAX_ROWS
        else:
            fast_rows = FUSED_MAX_ROWS if self.fused_kernel else GEMV_MAX_ROWS
        y = rows_then_matrix(x.reshape(-1, self.in_features), fast_rows, self._row_kernel, self._matrix_kernel)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _matrix_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2.to(self.matrix_dtype), self.dequantize(self.matrix_dtype)).to(x2.dtype)

    def _row_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        """Few rows, on the kernels that read the compact weight."""
        invariant = batch_invariant_enabled()
        if self.packed is not None and invariant:
            y = _fbgemm_per_row(x2.float(), self.packed, self.row_sums, self.vnni).to(x2.dtype)
        elif self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self.packed, not self.vnni).to(x2.dtype)
        elif self.fused_kernel:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.data, self.group, self.kernel_scale
            ).to(x2.dtype)
        else:
            fn = kernels.gemv_int8 if self.kind == "int8" else kernels.gemv_int4
            y = kernels.run(fn, x2.float().contiguous(), self.data, self.scale, self.offset).to(x2.dtype)
        return y

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows `ids` in fp32 (an embedding lookup when this layer is a tied head)."""
        return self.dequantize(torch.float32, ids.reshape(-1)).view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        kernel = "fbgemm" if self.packed is not None else "tinygemm bf16" if self.fused_kernel else "compiled fp32"
        return (f"{self.in_features} -> {self.out_features}, {self.kind} group {self.group}, {kernel}, "
                f"bias={self.bias is not None}")


def _fbgemm_per_row(x: torch.Tensor, packed, row_sums: torch.Tensor, vnni: bool) -> torch.Tensor:
    """fbgemm's dynamic int8 linear with every activation row quantized on its own range (batch invariance).

    fbgemm quantizes the whole batch with one range, so in a server batch one request's outliers would cost the
    others their precision and a row's result would depend on its neighbours. So each row is mapped onto [-1, 1],
    x = mid + half * u, with its extremes set to exactly -1 and 1: every row then spans [-1, 1], fbgemm's range is
    [-1, 1] for any batch, each row is quantized as it would be alone, and the integer products are exact.
    W x = half * (W u) + mid * (W 1). (A constant row keeps only one extreme; its W u term is scaled by 1e-30.)
    """
    hi, hi_at = x.max(dim=1, keepdim=True)
    lo, lo_at = x.min(dim=1, keepdim=True)
    mid = (hi + lo) * 0.5
    half = ((hi - lo) * 0.5).clamp_min_(1e-30)
    u = (x - mid).div_(half).clamp_(-1.0, 1.0)
    u.scatter_(1, lo_at, -1.0).scatter_(1, hi_at, 1.0)  # rounding must not leave a row short of the full range
    y = torch.ops.quantized.linear_dynamic(u, packed, not vnni)
    return torch.addcmul(mid * row_sums, y, half)


def _fbgemm_pack(weight: Int8Grouped):
    """fbgemm's packed form of a one-scale-per-row int8 weight (the bias stays apart: while a checkpoint loads,
    layers are built before their biases are read)."""
    import warnings

    scale = weight.scale[:, 0].double()
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the fbgemm ops are not gone
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight.q, scale, torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


class QuantEmbedding(nn.Module):
    """Embedding lookups from a QuantLinear's rows (shared with a tied head, or a table of its own)."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)
