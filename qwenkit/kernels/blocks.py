"""GGUF block matmuls and dequantization on the CPU kernels (csrc/blocks.c): weights stay in the file's Q4_0, Q5_0,
Q8_0, Q4_K, Q5_K or Q6_K bytes, activations are quantized to int8 per 32 values."""

from __future__ import annotations

import torch

from qwenkit.kernels.library import Part, check, library

# ggml type ids the kernels take (qwenkit.checkpoint.quants.GGMLType), with (values per block, bytes per block)
BLOCKS = {2: (32, 18), 6: (32, 22), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210)}


X8 = 256  # kernel type flag: rows interleaved by 8 (csrc/blocks.c, qk_repack)
INTERLEAVED = (2, 6, 8)  # Q4_0, Q5_0, Q8_0: their 8-row kernel does the work of 8 row kernels in a third of the steps


def supports(qtype: int) -> bool:
    return int(qtype) in BLOCKS


def row_bytes(qtype: int, k: int) -> int:
    per_block, nbytes = BLOCKS[int(qtype) & ~X8]
    return k // per_block * nbytes


def interleave(blocks: torch.Tensor, qtype: int, k: int) -> list[tuple[torch.Tensor, int]]:
    """A block tensor [N, row bytes] as the kernel's parts: its first N - N % 8 rows interleaved by 8 (types in
    INTERLEAVED), the rest as they are. The same bytes in all, in a new tensor."""
    n = int(blocks.shape[0])
    if int(qtype) not in INTERLEAVED or n < 8:
        return [(blocks, int(qtype))]
    out = torch.empty_like(blocks)
    check(library().qk_repack(blocks.data_ptr(), int(qtype), n, k, out.data_ptr()), "block repack")
    n8 = n - n % 8
    parts = [(out[:n8], int(qtype) | X8)]
    return parts + ([(out[n8:], int(qtype))] if n8 < n else [])


def plain(blocks: torch.Tensor, kernel_type: int, k: int) -> torch.Tensor:
    """The GGUF bytes of a kernel part (interleaved ones restored)."""
    if not kernel_type & X8:
        return blocks
    out = torch.empty_like(blocks)
    check(library().qk_unpack(blocks.data_ptr(), kernel_type & ~X8, int(blocks.shape[0]), k, out.data_ptr()),
           "block unpack")
    return out


class Parts:
    """Weights given as parts of stacked rows (each a uint8 tensor [rows, row bytes] of one block type), with the
    ctypes array describing them built once."""

    def __init__(self, blocks: list[tuple[torch.Tensor, int]]):
        self.blocks = blocks
        self.rows = sum(int(b.shape[0]) for b, _ in blocks)
        self.array = (Part * len(blocks))(*(Part(b.data_ptr(), int(t), int(b.shape[0])) for b, t in blocks))
        self._call = library().qk_matmul  # looked up once: a decode step makes over a hundred of these calls

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 contiguous -> [M, rows] float32."""
        m, k = x.shape
        y = torch.empty((m, self.rows), dtype=torch.float32)
        rc = self._call(self.array, len(self.blocks), x.data_ptr(), m, k, y.data_ptr(), torch.get_num_threads())
        if rc:
            check(rc, "block matmul")
        return y


def dequantize(blocks: torch.Tensor, qtype: int, k: int, dtype: torch.dtype = torch.float32,
               ids: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a block tensor (uint8 [N, row bytes]) as float32 or bfloat16 [N or len(ids), k], into `out` if given
    (contiguous): gguf-py's values (bfloat16: those rounded to nearest even)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return dequantize(blocks, qtype, k, torch.float32, ids).to(dtype)
    n = int(blocks.shape[0])
    if ids is not None:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
    shape = (n if ids is None else ids.numel(), k)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"block dequantize: out must be contiguous {dtype} {list(shape)}")
    rc = library().qk_dequantize(blocks.data_ptr(), int(qtype), n, k, None if ids is None else ids.data_ptr(),
                                 0 if ids is None else ids.numel(), out.data_ptr(), dtype == torch.bfloat16,
                                 torch.get_num_threads())
    check(rc, "block dequantize")
    return out
