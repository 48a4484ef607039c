"""A paged KV cache: one pool of fixed-size blocks that every running sequence draws from, with prefix caching.

Keys and values of layer l live in `k[l]`, `v[l]` of shape [num_blocks, kv_heads, block_size, head_dim], by
default float16 for a float32 model, as llama.cpp keeps them (half the bytes to read per token; see
qwenkit.quant.plan.default_kv_dtype). A sequence
owns a list of blocks and its token i sits in slot `blocks[i // block_size] * block_size + i % block_size`. Memory
follows what sequences actually hold instead of max_batch x max_model_len.

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

from qwenkit.engine.fused import FusedLayers, step_args
from qwenkit.kernels import attention as attention_kernels
from qwenkit.kernels.attention import Slots, block_size_shift
from qwenkit.kernels.library import available
from qwenkit.model.attention import Attention, causal_mask
from qwenkit.model.config import ModelConfig


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Identity of a full block: its tokens and, through the parent's hash, every token before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        block_size_shift(block_size)  # a power of two: the kernels find a slot's block with a shift
        # Block-major: a block holds every head's keys of its tokens (each head's together), and a sequence's
        # blocks, handed out in order, make one run of memory that a decode step reads front to back.
        shape = (num_blocks, config.num_key_value_heads, block_size, config.head_dim)
        # Left uninitialised: a slot is read only after its sequence wrote it, and untouched pages cost no memory,
        # so the pool's resident size follows the tokens actually held.
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.native = available()  # attention in the C kernels (qwenkit.kernels.attention) where they run
        self.bytes_per_token = self.bytes_per_token_of(config, dtype)
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.cached: dict[bytes, int] = {}  # hash -> block holding those tokens
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found

    @staticmethod
    def bytes_per_token_of(config: ModelConfig, dtype: torch.dtype) -> int:
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

    def register_full_blocks(self, seq) -> None:
        """Offer each block of `seq` that is full of computed tokens to the prefix cache, in order. seq has tokens,
        blocks, hashes (of the blocks offered so far), computed (leading tokens whose keys and values are in the
        pool), root (where its hash chain starts) and key_tokens(start, end) (what identifies its tokens: the
        tokens, with each image's placeholders keyed by the image)."""
        bs = self.block_size
        while (len(seq.hashes) + 1) * bs <= seq.computed:
            i = len(seq.hashes)
            h = block_hash(seq.hashes[-1] if seq.hashes else seq.root, seq.key_tokens(i * bs, (i + 1) * bs))
            self.register(seq.blocks[i], h)
            seq.hashes.append(h)

    def register(self, block: int, h: bytes) -> None:
        """Offer a newly filled block to the prefix cache (a concurrent twin may have registered it first)."""
        if h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h


class PagedBatch:
    """The attention context of one forward pass over the new tokens of several sequences, laid out flat: [1, N]
    token ids.

    Each segment is (rows, slots): the next `rows` rows of the flat batch are its new tokens, and `slots` (a
    LongTensor) lists the pool slots of its whole context in position order, the new tokens last. The model's
    attention layers call `attend`; everything else (projections, MLP, norms) runs on all N rows at once, which is
    where batching pays: the weights are read once per step for every sequence. Each row attends over its own
    sequence's keys only, never padded to its neighbours' lengths, so its result is the same in any batch.
    """

    def __init__(self, pool: BlockPool, segments: list[tuple[int, torch.Tensor]], positions: torch.Tensor,
                 fused: FusedLayers | None = None):
        self.pool = pool
        self.segments = segments
        self.fused = fused  # given for a step of generated rows only: its layers may run fused
        self._step: tuple | None = None  # (cos, the step's C arguments, what they point into)
        self.positions = positions[None]  # [1, N] absolute position of each new token
        starts, lengths, offset = [], [], 0
        for rows, slots in segments:
            starts.append(torch.full((rows,), offset, dtype=torch.long))
            lengths.append(torch.arange(slots.numel() - rows + 1, slots.numel() + 1))
            offset += slots.numel()
        self.slots = Slots(torch.cat([slots[-rows:] for rows, slots in segments]),
                           torch.cat([slots for _, slots in segments]), torch.cat(starts), torch.cat(lengths))

    def run_layer(self, layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor | None:
        if self.fused is None:
            return None
        if self._step is None or self._step[0] is not cos:  # once per step: every layer gets the same tables
            self._step = (cos, *step_args(self.slots, cos[0, 0], sin[0, 0]))
        return self.fused.run(layer, x, cos, sin, self._step[1])

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """Raw projections of the new tokens (q [1, N, H * D], k and v [1, N, KV * D]) -> [1, N, H * D]: the rows'
        keys and values are stored in the pool, then each row attends over its sequence's keys."""
        pool_k, pool_v = self.pool.k[layer.layer], self.pool.v[layer.layer]
        if self.pool.native and attention_kernels.takes(q, pool_k):
            # q/k norms, RoPE, the cache write and attention in one C call, each row alone (the same math as below)
            norms = (layer.q_norm.weight, layer.k_norm.weight, layer.q_norm.eps) if layer.q_norm is not None else (
                None, None, 0.0)
            return attention_kernels.paged_attention(
                q[0], k[0], v[0], layer.n_heads, layer.n_kv, *norms, cos[0, 0], sin[0, 0], pool_k, pool_v,
                self.slots, layer.window)[None]
        q, k, v = layer.heads(q, k, v, cos, sin)  # [1, H, N, D], [1, KV, N, D]
        bs = self.pool.block_size
        write = self.slots.write
        pool_k[write // bs, :, write % bs] = k[0].transpose(0, 1).to(pool_k.dtype)  # [N, KV, D]
        pool_v[write // bs, :, write % bs] = v[0].transpose(0, 1).to(pool_v.dtype)
        outs, first = [], 0
        for rows, slots in self.segments:
            length = slots.numel()
            if layer.window is not None and length > layer.window + rows - 1:  # only keys some new row can see
                slots = slots[-(layer.window + rows - 1):]
            ks = pool_k[slots // bs, :, slots % bs].transpose(0, 1)[None].to(q.dtype)  # [1, KV, L, D]
            vs = pool_v[slots // bs, :, slots % bs].transpose(0, 1)[None].to(q.dtype)
            qs = q[:, :, first:first + rows]
            if rows == 1:
                outs.append(_one_row(qs, ks, vs))
            else:
                positions = torch.arange(length - slots.numel(), length)
                mask = causal_mask(positions[-rows:, None], positions[None, :], layer.window)
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                           enable_gqa=layer.n_kv != layer.n_heads))
            first += rows
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [1, H, N, D]
        return out.transpose(1, 2).reshape(1, first, -1)


def _one_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over its context, as two small matmuls: for a single query, SDPA's flash kernel
    costs more in set-up than the work itself. q [1, H, 1, D]; k, v [1, KV, L, D] (grouped-query heads)."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, d)  # the query heads that share each key/value head
    scores = torch.matmul(qg, k.transpose(-1, -2)) * d**-0.5  # [B, KV, G, L]
    out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)  # [B, KV, G, D]
    return out.view(b, h, 1, d)
