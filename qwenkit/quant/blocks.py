"""Linear layers whose weights stay in GGUF's own quantized blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K).

The file's bytes are the weight: loading copies them and converts nothing, memory holds what the file holds, and
a decode step reads as many weight bytes as llama.cpp. Generated tokens (qwenkit.quant.linear.decode_rows), or up
to FUSED_MAX_ROWS rows outside the engine, run on the block kernels of qwenkit.kernels.blocks (each row computed
on its own: batch invariant by construction); prompt chunks dequantize the weight once per call, bf16 where the
CPU has it, and use the regular matrix kernel, except where the kernel plan runs them on the block kernels too
(Q4_0/Q5_0/Q8_0 layers on CPUs without native bf16: qwenkit.quant.plan.KernelPlan.prompt_on_blocks).

A layer may hold several parts of different block types stacked by rows: fused q/k/v or gate/up projections whose
tensors the quantizer gave different types (Q4_K_M files mix Q5_0 and Q8_0 in attn_v, for one) are still one call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.checkpoint.quants import GGMLType
from qwenkit.kernels import blocks as block_kernels
from qwenkit.quant.linear import FUSED_MAX_ROWS, rows_then_matrix
from qwenkit.quant.plan import KernelPlan


@dataclass
class BlockWeight:
    """A 2-D GGUF tensor in its blocks: uint8 [N, row bytes], ggml type `qtype`, PyTorch shape (N, K)."""

    blocks: torch.Tensor
    qtype: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n, k = self.shape
        if not block_kernels.supports(self.qtype):
            raise ValueError(f"BlockWeight: ggml type {self.qtype} has no block kernel")
        per_block = block_kernels.BLOCKS[int(self.qtype)][0]
        want = (n, block_kernels.row_bytes(self.qtype, k))
        if k % per_block or self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != want \
                or not self.blocks.is_contiguous():
            raise ValueError(f"BlockWeight: {GGMLType(self.qtype).name} [{n}, {k}] needs contiguous uint8 "
                             f"{list(want)}, got {self.blocks.dtype} {list(self.blocks.shape)}")

    @property
    def type_name(self) -> str:
        return GGMLType(self.qtype).name


def _one_width(widths: set[int]) -> int:
    if len(widths) != 1:
        raise ValueError(f"BlockLinear: parts of different input widths {sorted(widths)}")
    return widths.pop()


def joined_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    """The biases of layers joined along their rows, when every one has a bias."""
    if all(layer.bias is not None for layer in layers):
        return torch.cat([layer.bias.data for layer in layers])
    return None


class BlockLinear(nn.Module):
    def __init__(self, parts: list[BlockWeight], bias: torch.Tensor | None = None):
        super().__init__()
        # The kernel's own parts: Q4_0/Q5_0/Q8_0 rows interleaved by 8 (the same bytes, another order)
        in_features = _one_width({p.shape[1] for p in parts})
        kernel_parts = [kp for p in parts for kp in block_kernels.interleave(p.blocks, p.qtype, in_features)]
        self._install(kernel_parts, in_features, [p.type_name for p in parts], bias)

    def _install(self, kernel_parts: list[tuple[torch.Tensor, int]], in_features: int, type_names: list[str],
                 bias: torch.Tensor | None) -> None:
        self.in_features = in_features
        self.out_features = sum(int(b.shape[0]) for b, _ in kernel_parts)
        self.kernel_types = [t for _, t in kernel_parts]
        for i, (blocks, _) in enumerate(kernel_parts):
            self.register_buffer(f"blocks{i}", blocks)
        self.kind = "+".join(dict.fromkeys(type_names))  # what benchmarks and repr report
        plan = KernelPlan.detect()
        self.matrix_dtype = plan.matrix_dtype
        self.prompt_on_blocks = plan.prompt_on_blocks(self.kernel_types)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._kernel: tuple[tuple[torch.Tensor, ...], block_kernels.Parts] | None = None

    def _blocks(self) -> list[tuple[torch.Tensor, int]]:
        return [(getattr(self, f"blocks{i}"), t) for i, t in enumerate(self.kernel_types)]

    @property
    def parts(self) -> list[BlockWeight]:
        """The weight as GGUF tensors (row order kept; consecutive pieces of one type are one part again)."""
        pieces = [(block_kernels.plain(b, t, self.in_features), t & ~block_kernels.X8) for b, t in self._blocks()]
        merged: list[tuple[list[torch.Tensor], int]] = []
        for b, t in pieces:
            if merged and merged[-1][1] == t:
                merged[-1][0].append(b)
            else:
                merged.append(([b], t))
        out = []
        for bs, t in merged:
            blocks = torch.cat(bs) if len(bs) > 1 else bs[0]
            out.append(BlockWeight(blocks, t, (int(blocks.shape[0]), self.in_features)))
        return out

    @classmethod
    def joined(cls, layers: list[BlockLinear]) -> BlockLinear:
        """One layer whose rows are the layers' rows in order (their biases joined too, when all have one). It
        holds the layers' own buffers (interleaving stays within a part): nothing is copied."""
        width = _one_width({layer.in_features for layer in layers})
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out._install([kp for layer in layers for kp in layer._blocks()], width,
                     [name for layer in layers for name in layer.kind.split("+")], joined_bias(layers))
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def _parts(self) -> block_kernels.Parts:
        # The kernel holds raw pointers: rebuilt whenever a buffer was replaced (load_state_dict, .to(...)), which
        # replaces the tensor objects in _buffers. Compared by identity: this runs for every matmul of every
        # decode step, and a tuple of data_ptr() calls cost more than the smallest matmuls themselves.
        buffers = tuple(self._buffers.values())
        kernel = self._kernel
        if kernel is None or not all(map(operator.is_, kernel[0], buffers)) or len(kernel[0]) != len(buffers):
            blocks = self._blocks()
            for b, t in blocks:
                want = (int(b.shape[0]), block_kernels.row_bytes(t, self.in_features))
                if b.dtype != torch.uint8 or tuple(b.shape) != want or not b.is_contiguous():
                    raise ValueError(f"BlockLinear: a weight buffer was replaced by {b.dtype} {list(b.shape)}")
            kernel = self._kernel = (buffers, block_kernels.Parts(blocks))
        return kernel[1]

    # ---- the weight in other forms -----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or its rows `rows`) as [N or len(rows), K] in `dtype`: gguf-py's values."""
        if rows is not None:
            return self._rows(rows.reshape(-1), dtype)
        kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = torch.empty((self.out_features, self.in_features), dtype=kernel_dtype)
        start = 0
        for b, t in self._blocks():
            block_kernels.dequantize(b, t, self.in_features, kernel_dtype, out=out[start:start + b.shape[0]])
            start += b.shape[0]
        return out.to(dtype)

    def _rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        blocks = self._blocks()
        if len(blocks) == 1:
            return block_kernels.dequantize(blocks[0][0], blocks[0][1], self.in_features, dtype, ids=ids)
        if ((ids < 0) | (ids >= self.out_features)).any():
            raise ValueError(f"row ids must be in [0, {self.out_features})")
        out = torch.empty((ids.numel(), self.in_features), dtype=dtype)
        start = 0
        for b, t in blocks:
            inside = (ids >= start) & (ids < start + b.shape[0])
            if inside.any():
                out[inside] = block_kernels.dequantize(b, t, self.in_features, dtype, ids=ids[inside] - start)
            start += b.shape[0]
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows `ids` in fp32 (an embedding lookup when this layer is a tied head)."""
        return self._rows(ids.reshape(-1), torch.float32).view(*ids.shape, self.in_features)

    # ---- compute -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.prompt_on_blocks:  # every row on the block kernels (the kernel plan's choice for this CPU)
            y = self._row_kernel(x2)
        else:
            y = rows_then_matrix(x2, FUSED_MAX_ROWS, self._row_kernel, self._matrix_kernel)
        return y.view(*shape[:-1], self.out_features)

    def _row_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        y = self._parts().matmul(x2 if x2.dtype == torch.float32 and x2.is_contiguous() else
                                 x2.to(torch.float32).contiguous())
        if self.bias is not None:  # in float32, before any cast
            y += self.bias
        return y if x2.dtype == torch.float32 else y.to(x2.dtype)

    def _matrix_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        y = F.linear(x2.to(self.matrix_dtype), self.dequantize(self.matrix_dtype)).to(x2.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, GGUF {self.kind} blocks, bias={self.bias is not None}"
