"""Attention: the layer, the one place causal masks are built, and attention over whole sequences (no KV cache).

The layer projects q, k and v and hands them, raw, to the forward pass's attention context with one call,
`context.attend(layer, q, k, v, cos, sin)`. The context decides how keys are kept and which kernel runs:
- WholeSequences (here): a forward pass over complete sequences, as training and scoring run, with SDPA;
- the serving engine's paged KV cache (qwenkit.engine.paged): new tokens of many sequences over their cached keys.
Either one gets from the layer what it needs (head counts, window, the q/k norms, `heads` for the PyTorch math),
so the layer holds no flag about its caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.model.config import ModelConfig
from qwenkit.model.norm import RMSNorm
from qwenkit.model.rope import apply_rotary


class AttentionContext(Protocol):
    positions: torch.Tensor  # [B, T] position of every token of the forward pass

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """Raw projections q [B, T, H * D], k and v [B, T, KV * D] -> attention output [B, T, H * D]."""

    def run_layer(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """The whole decoder layer's output, where the context has a faster way to get exactly the modules'
        numbers (the serving engine's decode steps: qwenkit.engine.fused); None: the layer's modules run."""


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                same: torch.Tensor | None = None) -> torch.Tensor:
    """True where a query at q_pos [..., Tq, 1] may see a key at k_pos [..., 1, Tk]: at or before it, within the
    sliding window when there is one (transformers' convention), and, with `same`, in the same packed sequence."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    return allowed if same is None else allowed & same


class Packed(nn.Module):
    """A module whose projections that share an input may run as one matrix product (nano-vllm's
    packed_modules_mapping): `packed` names the joined projection and its parts, in output order, and `split`
    gives the parts' output sizes. Checkpoints fill the parts by their Hugging Face names; pack() joins them where
    the weights' format allows."""

    packed: dict[str, tuple[str, ...]] = {}
    split: tuple[int, ...] = ()

    def pack(self, join: Callable[[list[nn.Module]], nn.Module | None]) -> None:
        """Join each group of parts into one projection with `join` (None: the group stays apart)."""
        for fused, parts in self.packed.items():
            joined = join([getattr(self, p) for p in parts])
            if joined is not None:
                setattr(self, fused, joined)
                for p in parts:
                    setattr(self, p, None)

    def packed_part(self, name: str) -> tuple[str, int] | None:
        """(joined projection, index of the part) for part `name` when it runs joined, else None."""
        for fused, parts in self.packed.items():
            if name in parts and getattr(self, fused) is not None:
                return fused, parts.index(name)
        return None


class Attention(Packed):
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

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
        self.qkv_proj = None
        self.split = (q_dim, kv_dim, kv_dim)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(context.attend(self, q, k, v, cos, sin))

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw projections [B, T, *] -> q [B, H, T, D] and k [B, KV, T, D] normed (Qwen3) and rotated, v
        [B, KV, T, D]: the PyTorch form of what the attention kernels do before attending."""
        b, t, _ = q.shape
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv, self.head_dim)
        v = v.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3: RMSNorm over head_dim before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin), v


class WholeSequences:
    """The attention context of a forward pass over complete sequences, without a KV cache (training, scoring).

    `segments` [B, T] packs several sequences per row (non-decreasing ids along a row): a token then attends
    causally within its own sequence only, and positions restart at 0 with each one, so a packed row computes
    what its sequences would alone."""

    def __init__(self, batch: int, length: int, windows: set[int | None], device: torch.device,
                 segments: torch.Tensor | None = None):
        index = torch.arange(length, device=device).expand(batch, length)
        self.masks: dict[int | None, torch.Tensor | None] = {}
        if segments is None:
            self.positions = index
            for w in windows:  # full attention runs as SDPA's plain causal: no mask, the upper blocks skipped
                self.masks[w] = None if w is None else causal_mask(index[0, :, None], index[0, None, :], w)
            return
        segments = segments.to(device)
        starts = torch.cat([torch.ones_like(segments[:, :1], dtype=torch.bool), segments[:, 1:] != segments[:, :-1]], 1)
        first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        self.positions = index - first
        same = segments[:, :, None] == segments[:, None, :]
        for w in windows:
            self.masks[w] = causal_mask(index[:, :, None], index[:, None, :], w, same)[:, None]

    def run_layer(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        return None

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = q.shape
        q, k, v = layer.heads(q, k, v, cos, sin)
        mask, gqa = self.masks[layer.window], layer.n_kv != layer.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, t, -1)
