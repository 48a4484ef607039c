"""A paged KV cache: one pool of fixed-size blocks that every running sequence draws from, with prefix caching.

Keys and values of layer l live in `k[l]`, `v[l]` of shape [num_blocks * block_size, kv_heads, head_dim]; a
sequence owns a list of blocks and its token i sits in slot `blocks[i // block_size] * block_size + i % block_size`.
Memory follows what sequences actually hold instead of max_batch x max_model_len.

Prefix caching: a block filled with tokens is registered under a hash of those tokens and of everything before them
(the parent block's hash), so two requests that share a system prompt find its blocks already computed. A block
nobody references any more stays cached (evictable, least recently used first) until its memory is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch
import torch.nn.functional as F

from qwenkit.model.config import ModelConfig
from qwenkit.quant import native


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Identity of a full block: its tokens and, through the parent's hash, every token before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.cached: dict[bytes, int] = {}  # hash -> block holding those tokens
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize

    # ---- counts --------------------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached but unused and so evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    # ---- allocation ----------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:
            raise MemoryError("KV cache pool exhausted")  # the scheduler checks `available` first
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    # ---- prefix cache --------------------------------------------------------------------------------------------
    def match_prefix(self, tokens: list[int], limit: int, root: bytes = b"") -> tuple[list[int], list[bytes]]:
        """Blocks already holding the first full blocks of `tokens` (at most `limit` tokens' worth), each now
        referenced by the caller, and their hashes. `root` starts the hash chain (one per LoRA adapter)."""
        blocks, hashes, parent = [], [], root
        full = min(len(tokens), limit) // self.block_size
        for i in range(full):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            blocks.append(block)
            hashes.append(h)
            parent = h
        self.queries += full * self.block_size
        self.hits += len(blocks) * self.block_size
        return blocks, hashes

    def register(self, block: int, h: bytes) -> None:
        """Offer a newly filled block to the prefix cache (a concurrent twin may have registered it first)."""
        if h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h


class PagedBatch:
    """One forward pass over the new tokens of several sequences, laid out flat: [1, N] token ids.

    Each segment is (first row, rows, slots): its new tokens are rows [first, first + rows) of the flat batch, and
    `slots` (a LongTensor) lists the pool slots of its whole context, the new tokens last. The model's attention
    calls `attend` per layer; everything else (projections, MLP, norms) runs on all N rows at once, which is where
    batching pays: the weights are read once per step for every sequence.
    """

    paged = True

    def __init__(self, pool: BlockPool, segments: list[tuple[int, int, torch.Tensor]], positions: torch.Tensor):
        self.pool = pool
        self.segments = segments
        self.positions = positions  # [N] absolute position of each new token
        self.write_slots = torch.cat([slots[-rows:] for _, rows, slots in segments])
        self._contexts: dict[int | None, tuple[torch.Tensor, list[tuple[int, int]]]] = {}

    def _context(self, window: int | None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Every segment's context slots in one index (one gather per layer instead of one per sequence), and each
        segment's (offset, length) in it; with a sliding window, only the keys some new token can still see."""
        if window not in self._contexts:
            parts, spans, offset = [], [], 0
            for _, rows, slots in self.segments:
                if window is not None and slots.numel() > window + rows - 1:
                    slots = slots[-(window + rows - 1) :]
                parts.append(slots)
                spans.append((offset, slots.numel()))
                offset += slots.numel()
            self._contexts[window] = (torch.cat(parts), spans)
        return self._contexts[window]

    def attend(self, layer: int, window: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, H, N, D], k and v [1, KV, N, D] of the new tokens -> attention output [1, N, H * D].

        Each sequence attends over its own keys only, never padded to its neighbours' lengths, so its result is the
        same in any batch."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        pool_k[self.write_slots] = k[0].transpose(0, 1).to(pool_k.dtype)
        pool_v[self.write_slots] = v[0].transpose(0, 1).to(pool_v.dtype)
        n_heads, n_kv = q.shape[1], k.shape[1]
        slots, spans = self._context(window)
        all_k = pool_k[slots].transpose(0, 1)  # [KV, L_total, D]
        all_v = pool_v[slots].transpose(0, 1)
        outs = []
        for (first, rows, _), (offset, length) in zip(self.segments, spans):
            ks = all_k[:, offset : offset + length].unsqueeze(0)  # [1, KV, L, D]
            vs = all_v[:, offset : offset + length].unsqueeze(0)
            qs = q[:, :, first : first + rows]
            # The C kernel computes each row alone: a prompt token's result is then the same in a chunk of 40
            # rows as after a prefix-cache hit, where it is computed alone (same seed, same text).
            out = native.attend(qs, ks, vs, window) if native.available() else None
            if out is None and rows == 1:
                out = decode_attention(qs, ks, vs)
            elif out is None:
                out = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=_causal(rows, length, window), enable_gqa=n_kv != n_heads
                )
            outs.append(out)
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [1, H, N, D]
        return out.transpose(1, 2).reshape(1, q.shape[2], -1)


def _causal(rows: int, length: int, window: int | None) -> torch.Tensor:
    """[rows, length] True where new token i (at position length - rows + i) may see key j."""
    q_pos = torch.arange(length - rows, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over the cache, as two small matmuls: for a single query, SDPA's flash kernel
    costs more in set-up than the work itself. q [B, H, 1, D]; k, v [B, KV, L, D] (grouped-query heads).
    Where the CPU kernels are built (qwenkit.quant.native), one fused pass over the cache instead."""
    if native.available():
        out = native.attend(q, k, v)
        if out is not None:
            return out
    k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 cache: no copy when the dtypes agree
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, d)  # the query heads that share each key/value head
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d**-0.5  # [B, KV, G, L]
    out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)  # [B, KV, G, D]
    return out.view(b, h, 1, d)
