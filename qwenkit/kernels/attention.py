"""Attention over a paged KV pool on the CPU kernels (csrc/attention.c)."""

from __future__ import annotations

import torch

from qwenkit.kernels.library import check, library

POOL_DTYPES = (torch.float32, torch.float16)


class Slots:
    """Where the rows of one forward pass write and read in the pool: row n stores its key and value in slot
    write[n] and attends over slots context[starts[n] : starts[n] + lengths[n]] (its sequence's slots in position
    order, itself last). Built once per step, read by every layer."""

    def __init__(self, write: torch.Tensor, context: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor):
        self.write, self.context = write.to(torch.int64).contiguous(), context.to(torch.int64).contiguous()
        self.starts, self.lengths = starts.to(torch.int64).contiguous(), lengths.to(torch.int64).contiguous()
        if len(self.starts) and (int((self.starts + self.lengths).max()) > self.context.numel()
                                 or int(self.starts.min()) < 0 or int(self.lengths.min()) < 1):
            raise ValueError("paged attention: a row's context runs past the slot list")


def block_size_shift(block_size: int) -> int:
    """log2 of a pool's block size: the kernels find a slot's block with a shift, so the size is a power of two."""
    if block_size < 1 or block_size & (block_size - 1) or block_size > 1 << 16:
        raise ValueError(f"KV block size {block_size}: a power of two up to 65536")
    return block_size.bit_length() - 1


def float32_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as the kernels read it: float32, contiguous (t itself when it already is; None stays None)."""
    return None if t is None else t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def takes(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether paged_attention runs for these dtypes: float32 activations over a float32 or float16 pool."""
    return q.dtype == torch.float32 and pool.dtype in POOL_DTYPES


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int,
                    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor,
                    sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: Slots,
                    window: int | None) -> torch.Tensor:
    """The attention of N new tokens from their raw projections: q [N, H * D], k and v [N, KV * D] float32 (row
    strides free, e.g. views of one fused projection); Qwen3's q/k norms where their weights are given; RoPE with
    cos, sin [N, D]; keys and values stored in the pools [blocks, KV, block_size, D] (slot s: block
    s // block_size, position s % block_size); each row attending over its own context (Slots). -> [N, H * D]
    float32."""
    # A decode step makes one call per layer: the checks are kept to plain comparisons (each costs a fraction of
    # a microsecond, where the kernel's work for a short context is a few microseconds).
    n, d = q.shape[0], k_pool.shape[-1]
    f32 = torch.float32
    if not (q.dtype == k.dtype == v.dtype == f32 and q.shape == (n, heads * d)
            and k.shape == v.shape == (n, kv_heads * d) and q.stride(1) == k.stride(1) == v.stride(1) == 1):
        raise ValueError("paged attention: q, k, v must be float32 [rows, heads * head_dim] with unit stride")
    if k_pool.dtype not in POOL_DTYPES or v_pool.dtype != k_pool.dtype or k_pool.shape != v_pool.shape \
            or k_pool.dim() != 4 or k_pool.shape[1] != kv_heads \
            or not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("paged attention: pools must be contiguous float16/float32 [blocks, kv_heads, block_size, "
                         "head_dim]")
    block_shift = block_size_shift(k_pool.shape[2])
    if not slots.write.numel() == slots.starts.numel() == slots.lengths.numel() == n:
        raise ValueError("paged attention: one write slot, context start and length per row")
    cos, sin = float32_contiguous(cos.reshape(n, d)), float32_contiguous(sin.reshape(n, d))
    weights = [float32_contiguous(w) for w in (q_norm, k_norm)]
    out = torch.empty((n, heads * d), dtype=f32)
    rc = library().qk_paged_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), n, heads, kv_heads, d,
        *(w.data_ptr() if w is not None else None for w in weights), eps, cos.data_ptr(), sin.data_ptr(),
        k_pool.data_ptr(), v_pool.data_ptr(), k_pool.dtype == torch.float16, k_pool.shape[0], block_shift,
        slots.write.data_ptr(), slots.context.data_ptr(), slots.starts.data_ptr(), slots.lengths.data_ptr(),
        window or 0, d**-0.5, out.data_ptr(), torch.get_num_threads())
    check(rc, "paged attention")
    return out
