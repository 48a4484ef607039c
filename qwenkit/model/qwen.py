"""The Qwen decoder (Qwen2/2.5, Qwen3, Qwen2-MoE, Qwen3-MoE), switched by ModelConfig.

Parameter names are the Hugging Face ones (model.layers.N.self_attn.q_proj.weight, lm_head.weight, ...), so a
safetensors checkpoint loads without renaming. The forward pass takes an optional KV cache: tokens are appended at
the cache's current length, so a prompt is computed once and each decode step only runs the new token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from qwenkit.model.config import ModelConfig
from qwenkit.model.moe import SparseMoE
from qwenkit.engine.paged import decode_attention
from qwenkit.model.rope import Rotary, apply_rotary
from qwenkit.quant import native


def native_step(x: torch.Tensor, cache) -> bool:
    """A decode step (one new token per sequence) on a KVCache made for the block kernels (KVCache.fused): its
    norms and attention run as single C calls (qwenkit.quant.native), the same math without the op dispatch."""
    return x.shape[1] == 1 and cache is not None and not cache.paged and cache.fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, native_decode: bool = False) -> torch.Tensor:
        if native_decode:  # see native_step
            return native.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # One fused kernel instead of six ops: the same fp32 math, and decode runs it 49 times per token.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 and cast back before scaling, exactly as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj = None  # set by qwenkit.quant.apply.fuse: gate and up in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window = config.layer_window(layer)
        h, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, h, bias=config.o_bias)
        self.qkv_proj = None  # set by qwenkit.quant.apply.fuse: q, k and v in one matmul
        self.split = (q_dim, kv_dim, kv_dim)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, masks, cache, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None and native_step(x, cache):
            # q/k norms, RoPE, cache write and attention in one C call: the math below without its ~30 small ops.
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else (
                None, None, 0.0)
            out = native.decode_attention(self.qkv_proj(x).view(b, -1), self.n_heads, self.n_kv, *norms,
                                          cos[:, 0, 0], sin[:, 0, 0], cache.k[self.layer], cache.v[self.layer], start,
                                          self.window)
            return self.o_proj(out.view(b, 1, -1))
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv, self.head_dim)
        v = v.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3: RMSNorm over head_dim before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None and cache.paged:  # the serving engine: many sequences in one flat batch
            return self.o_proj(cache.attend(self.layer, self.window, q, k, v))
        if cache is not None:
            k, v = cache.write(self.layer, start, k, v)
        mask = masks.get(self.window)
        # On the block kernels (KVCache.fused) prompt chunks attend in C too, over the float16 cache in place.
        out = native.attend(q, k, v, self.window) if cache is not None and cache.fused else None
        if out is None and t == 1 and mask is None:
            out = decode_attention(q, k, v)
        elif out is None:
            if k.dtype != q.dtype:  # a float16 cache (block-quantized models): prompt chunks attend in q's dtype
                k, v = k.to(q.dtype), v.to(q.dtype)
            gqa = self.n_kv != self.n_heads
            if mask is None:  # a whole sequence at once (training, scoring): plain causal, no mask to build
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, masks, cache, start):
        native_decode = native_step(x, cache)
        x = x + self.self_attn(self.input_layernorm(x, native_decode), cos, sin, masks, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x, native_decode))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def attention_masks(windows: set[int | None], start: int, t: int, device: torch.device, cached: bool = True) -> dict:
    """Boolean masks [t, start + t] (True = may attend) for each window size in use; None means full attention.

    A single decode step with full attention needs no mask at all: it may see every cached key; nor does a whole
    sequence without a cache (cached=False) or a prompt's first chunk (start 0), which attention runs as plain
    causal: SDPA then skips the blocks above the diagonal instead of computing them to mask them out.
    """
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    masks: dict = {}
    for w in windows:
        if w is None and (t == 1 or not cached or start == 0):
            masks[w] = None
            continue
        allowed = k_pos <= q_pos
        if w is not None:
            allowed = allowed & (q_pos - k_pos < w)  # same window convention as transformers
        masks[w] = allowed
    return masks


def packed_masks(windows: set[int | None], segments: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Positions [B, T] and masks [B, 1, T, T] for rows that pack several sequences: `segments` [B, T] numbers the
    sequence each token belongs to (non-decreasing along a row). A token attends causally within its own sequence
    only, and positions restart at 0 with each sequence, so a packed row computes what its sequences would alone."""
    b, t = segments.shape
    index = torch.arange(t, device=segments.device).expand(b, t)
    starts = torch.cat([torch.ones_like(segments[:, :1], dtype=torch.bool), segments[:, 1:] != segments[:, :-1]], 1)
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    positions = index - first
    same = segments[:, :, None] == segments[:, None, :]
    causal = index[:, :, None] >= index[:, None, :]
    masks = {}
    for w in windows:
        allowed = same & causal
        if w is not None:
            allowed = allowed & (index[:, :, None] - index[:, None, :] < w)
        masks[w] = allowed[:, None]
    return positions, masks


class QwenForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.rotary = Rotary(config)
        self.windows = {config.layer_window(i) for i in range(config.num_hidden_layers)}
        self.gradient_checkpointing = False  # training: recompute each layer in backward instead of storing it
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the norms: quantized layers keep their weights in other types)."""
        return self.model.norm.weight.dtype

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)

    def forward(self, input_ids: torch.Tensor, cache=None, logits: str | torch.Tensor = "all",
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ("all"), [B, V] ("last"), [B, R, V] (a tensor of R row indices)
        or final hidden states ("none").

        With a KVCache, the tokens continue the cached sequence (positions start at cache.length) and the cache
        grows. With a PagedBatch (qwenkit.engine.paged), B is 1 and the T tokens belong to several sequences whose
        positions and attention the batch describes. Without a cache, `segments` [B, T] packs several sequences
        per row (training): see packed_masks.
        """
        b, t = input_ids.shape
        paged = cache is not None and cache.paged
        start = cache.length if cache is not None and not paged else 0
        if cache is not None and not paged:
            cache.reserve(start + t)
        x = self.model.embed_tokens(input_ids)
        if paged:
            positions, masks = cache.positions[None], {}
        elif segments is not None:
            if cache is not None:
                raise ValueError("packed sequences (segments) are for whole-sequence forwards, without a cache")
            positions, masks = packed_masks(self.windows, segments.to(input_ids.device))
        else:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
            masks = attention_masks(self.windows, start, t, input_ids.device, cached=cache is not None)
        cos, sin = self.rotary(positions, x.dtype)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # keep only each layer's input; its activations are recomputed during backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks, cache, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks, cache, start)
        if cache is not None and not paged:
            cache.length = start + t
        if isinstance(logits, torch.Tensor):
            x = x[:, logits]
        elif logits == "last":
            x = x[:, -1]
        elif logits == "none":
            return self.model.norm(x)
        return self.head(self.model.norm(x))
