"""Linear and embedding layers over the compact weight formats (Int8Grouped, Int4Grouped).

Decode (a few rows of activations) runs the compiled matrix-vector kernels on the packed weights. Prefill (many
rows) dequantizes the weight once per call, a few MB per layer, and multiplies with the regular fp32 kernel: there
the work is compute-bound and the copy is small against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant import kernels
from qwenkit.quant.formats import Int4Grouped, Int8Grouped

GEMV_MAX_ROWS = 4  # up to this many activation rows, read the packed weights directly


class QuantLinear(nn.Module):
    def __init__(self, weight: Int8Grouped | Int4Grouped, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = weight.group
        self.kind = "int8" if isinstance(weight, Int8Grouped) else "int4"
        data = weight.q if self.kind == "int8" else weight.packed
        self.register_buffer("data", data)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def format(self) -> Int8Grouped | Int4Grouped:
        if self.kind == "int8":
            return Int8Grouped(self.data, self.scale, self.offset, self.group)
        return Int4Grouped(self.data, self.scale, self.offset, self.group)

    @property
    def nbytes(self) -> int:
        return self.format.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= GEMV_MAX_ROWS:
            fn = kernels.gemv_int8 if self.kind == "int8" else kernels.gemv_int4
            y = kernels.run(fn, x2.float().contiguous(), self.data, self.scale, self.offset).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.format.dequantize().to(x.dtype), self.bias)
        return y.view(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows `ids` (an embedding lookup when this layer is a tied head)."""
        flat = ids.reshape(-1)
        g, n_groups = self.group, self.scale.shape[1]
        if self.kind == "int8":
            w = self.data[flat].view(-1, n_groups, g).float()
        else:
            w = Int4Grouped(self.data[flat], self.scale[flat], self.offset[flat], g).unpack().view(-1, n_groups, g).float()
        w = w * self.scale[flat].unsqueeze(-1)
        if self.offset is not None:
            w = w + self.offset[flat].unsqueeze(-1)
        return w.view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind} group {self.group}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Embedding lookups from a QuantLinear's rows (shared with a tied head, or a table of its own)."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the dtype
        return self.table.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)
