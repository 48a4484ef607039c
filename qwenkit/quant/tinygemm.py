"""The int4 layout of PyTorch's CPU kernel `_weight_int4pack_mm_for_cpu` ("tinygemm"), to and from ours.

Rows come in blocks of 64; for each column k a block stores 32 bytes, byte j holding row j in its low nibble and
row j + 32 in its high nibble: flat index (block, k, j). The kernel computes w = (q - 8) * scale + zero per group,
so zero = offset + 8 * scale, with scales and zeros given as one bf16 tensor [groups, N, 2].
"""

from __future__ import annotations

import torch

BLOCK = 64
GROUPS = (32, 64, 128, 256)  # group sizes the kernel accepts


def supported(n: int, k: int, group: int) -> bool:
    return n % BLOCK == 0 and group in GROUPS and k % group == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] with values 0..15 -> the kernel's packed uint8 [N, K // 2]."""
    n, k = q.shape
    blocks = q.view(n // BLOCK, 2, BLOCK // 2, k)  # (block, half, j, k)
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # (block, j, k)
    return packed.transpose(1, 2).contiguous().view(n, k // 2)


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Values (uint8 0..15) of the given rows, [len(rows), K]."""
    n = packed.shape[0]
    by_k = packed.view(n // BLOCK, k, BLOCK // 2)
    j = rows % BLOCK
    picked = by_k[rows // BLOCK, :, j % (BLOCK // 2)]  # [R, K]
    return torch.where((j < BLOCK // 2)[:, None], picked & 15, picked >> 4)


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """All values, uint8 [N, K]."""
    n = packed.shape[0]
    by_k = packed.view(n // BLOCK, k, BLOCK // 2).transpose(1, 2)  # (block, j, k)
    return torch.stack((by_k & 15, by_k >> 4), dim=1).reshape(n, k)


def scales_and_zeros(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Our fp32 scale/offset [N, G] -> the kernel's bf16 [G, N, 2]."""
    return torch.stack((scale, offset + 8 * scale), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
