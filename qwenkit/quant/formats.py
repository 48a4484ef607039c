"""Two compact "grouped" weight formats for the fast CPU linear layers (plain torch tensors, no custom dtypes).

N = output rows, K = input columns, g = group size along K, G = K // g.

- ``Int8Grouped``: ``q`` int8 [N, K], ``scale`` float32 [N, G], ``offset`` float32 [N, G] or None.
  w[n, k] = q[n, k] * scale[n, k // g] + offset[n, k // g]   (no offset: + 0).
- ``Int4Grouped``: ``packed`` uint8 [N, K // 2], ``scale`` and ``offset`` float32 [N, G].
  w = q * scale + offset with q in 0..15; inside each group of g elements, byte j (0 <= j < g/2) holds element j in
  its low nibble and element j + g/2 in its high nibble (GGUF Q4_0's order, so Q4_0 blocks map unchanged).

``dequantize`` computes exactly ``float32(q) * scale`` then ``+ offset``, two separately rounded float32 operations
(never a fused multiply-add), so formats converted from GGUF dequantize to the same values as
``qwenkit.checkpoint.quants.dequantize`` (see ``from_gguf``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Int8Grouped", "Int4Grouped", "DEQUANT_CHUNK_ELEMENTS"]

# Elements of fp32 output produced per step of ``dequantize``; bounds its temporaries to a few MiB.
DEQUANT_CHUNK_ELEMENTS = 1 << 18


def _rows_per_chunk(k: int) -> int:
    return max(1, DEQUANT_CHUNK_ELEMENTS // max(1, k))


def _check_groups(name: str, n: int, k: int, group: int, scale: torch.Tensor, offset: torch.Tensor | None) -> None:
    if group <= 0 or k % group:
        raise ValueError(f"{name}: K={k} is not a multiple of the group size {group}")
    want = (n, k // group)
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"{name}: scale must be float32 {list(want)}, got {scale.dtype} {list(scale.shape)}")
    if offset is not None and (offset.dtype != torch.float32 or tuple(offset.shape) != want):
        raise ValueError(f"{name}: offset must be float32 {list(want)}, got {offset.dtype} {list(offset.shape)}")


@dataclass
class Int8Grouped:
    """int8 weights with a float32 scale (and optional offset) per group of ``group`` columns of each row."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K // group]
    offset: torch.Tensor | None  # float32 [N, K // group] or None (symmetric)
    group: int

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"Int8Grouped: q must be a 2-D int8 tensor, got {self.q.dtype} {list(self.q.shape)}")
        n, k = self.q.shape
        _check_groups("Int8Grouped", n, k, self.group, self.scale, self.offset)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    @property
    def nbytes(self) -> int:
        n = self.q.nbytes + self.scale.nbytes
        return n + (self.offset.nbytes if self.offset is not None else 0)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (on the weights' device), computed over chunks of rows."""
        return _dequantize(self.q, self.shape, self.group, self.scale, self.offset, lambda a, b: self.q[a:b])


@dataclass
class Int4Grouped:
    """4-bit unsigned weights (two per byte, see module docstring) with a float32 scale and offset per group."""

    packed: torch.Tensor  # uint8 [N, K // 2]
    scale: torch.Tensor  # float32 [N, K // group]
    offset: torch.Tensor  # float32 [N, K // group]
    group: int

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 2:
            raise ValueError(f"Int4Grouped: packed must be a 2-D uint8 tensor, got {self.packed.dtype} "
                             f"{list(self.packed.shape)}")
        if self.group <= 0 or self.group % 2:
            raise ValueError(f"Int4Grouped: the group size must be a positive even number, got {self.group}")
        if self.offset is None:
            raise ValueError("Int4Grouped: offset is required (q is unsigned 0..15)")
        n, half = self.packed.shape
        _check_groups("Int4Grouped", n, 2 * half, self.group, self.scale, self.offset)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.packed.shape[0]), 2 * int(self.packed.shape[1]))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.offset.nbytes

    @classmethod
    def from_values(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> Int4Grouped:
        """Pack values q (uint8 0..15, [N, K], natural column order) into this layout."""
        n, k = q.shape
        h = group // 2
        grouped = q.reshape(n, k // group, 2, h)
        packed = grouped[:, :, 0] | (grouped[:, :, 1] << 4)
        return cls(packed.reshape(n, k // 2).contiguous(), scale, offset, group)

    def unpack(self, rows: slice | None = None) -> torch.Tensor:
        """The 4-bit values q (0..15) as uint8 [rows, K] in natural column order."""
        p = self.packed if rows is None else self.packed[rows]
        n, half = p.shape
        g = self.group
        q = torch.empty((n, 2 * half), dtype=torch.uint8, device=p.device)
        src, dst = p.reshape(n, 2 * half // g, g // 2), q.view(n, 2 * half // g, g)
        if p.device.type == "cpu":
            sn, dn = src.detach().numpy(), dst.numpy()
            np.bitwise_and(sn, np.uint8(0x0F), out=dn[:, :, :g // 2])
            np.right_shift(sn, np.uint8(4), out=dn[:, :, g // 2:])
        else:
            torch.bitwise_and(src, 0x0F, out=dst[:, :, :g // 2])
            torch.bitwise_right_shift(src, 4, out=dst[:, :, g // 2:])
        return q

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (on the weights' device), computed over chunks of rows."""
        return _dequantize(self.packed, self.shape, self.group, self.scale, self.offset,
                           lambda a, b: self.unpack(slice(a, b)))


def _dequantize(like: torch.Tensor, shape: tuple[int, int], g: int, scale: torch.Tensor,
                offset: torch.Tensor | None, values) -> torch.Tensor:
    """out[n, k] = float32(values(rows)[n, k]) * scale[n, k // g], then + offset[n, k // g]: two float32 roundings.

    On CPU through numpy, single-threaded: torch's broadcast multiply over (rows, G, g) spent 35x longer in its
    thread pool on this 2-core machine while the other core was busy (2.4 s vs 0.07 s for 26M elements)."""
    n, k = shape
    out = torch.empty((n, k), dtype=torch.float32, device=like.device)
    cpu = like.device.type == "cpu"
    step = _rows_per_chunk(k)
    with torch.no_grad():
        for a in range(0, n, step):
            b = min(a + step, n)
            v = values(a, b).detach().reshape(b - a, k // g, g)
            o = out[a:b].view(b - a, k // g, g)
            if cpu:
                on = o.numpy()
                np.multiply(v.numpy(), scale[a:b, :, None].detach().numpy(), out=on, dtype=np.float32)
                if offset is not None:
                    np.add(on, offset[a:b, :, None].detach().numpy(), out=on)
            else:
                torch.mul(v.to(torch.float32), scale[a:b, :, None], out=o)
                if offset is not None:
                    o.add_(offset[a:b, :, None])
    return out
