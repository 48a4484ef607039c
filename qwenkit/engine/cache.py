"""A contiguous, preallocated KV cache for one batch of sequences that advance together.

Each layer keeps K and V as [batch, kv_heads, capacity, head_dim]; a forward pass writes its new keys at the current
length and attends over the filled prefix, so a decode step never recomputes or reallocates the prompt's keys.
"""

from __future__ import annotations

import torch

from qwenkit.model.config import ModelConfig


def native_decode(model) -> bool:
    """Whether a model's weights run on the GGUF block kernels (qwenkit.quant.native): its cache is then float16,
    as llama.cpp keeps it (the attention kernel reads half the bytes, converting as it reads), and each decode
    step's attention after the q/k/v projection is one C call (norms, RoPE, cache write, attention)."""
    from qwenkit.quant import native
    from qwenkit.quant.blocks import BlockLinear

    return model.dtype == torch.float32 and isinstance(model, torch.nn.Module) and native.available() \
        and any(isinstance(m, BlockLinear) for m in model.modules())


class KVCache:
    paged = False  # see qwenkit.engine.paged.PagedBatch for the serving engine's cache

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device="cpu",
                 fused: bool = False):
        self.config, self.batch, self.dtype, self.device = config, batch, dtype, torch.device(device)
        self.fused = fused  # attention (and a decode step's norms) in qwenkit.quant.native: see native_decode
        self.length = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._allocate(capacity)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> KVCache:
        """The cache generation uses for `model`: float16 and fused decode on the block kernels, else its dtype."""
        fused = native_decode(model)
        return cls(model.config, batch, capacity, torch.float16 if fused else model.dtype, fused=fused)

    def _allocate(self, capacity: int) -> None:
        shape = (self.batch, self.config.num_key_value_heads, capacity, self.config.head_dim)
        new_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.config.num_hidden_layers)]
        new_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.config.num_hidden_layers)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, : self.length].copy_(old[:, :, : self.length])
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions; grows geometrically only when the caller under-reserved."""
        if needed > self.capacity:
            self._allocate(max(needed, 2 * self.capacity))

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat(self, n: int) -> KVCache:
        """A cache of batch n whose every row copies this batch-1 cache (n samples of one prompt share its prefill)."""
        if self.batch != 1:
            raise ValueError("repeat() expects a batch-1 cache")
        out = KVCache(self.config, n, self.capacity, self.dtype, self.device, self.fused)
        for dst, src in zip(out.k + out.v, self.k + self.v):
            dst[:, :, : self.length].copy_(src[:, :, : self.length].expand(n, -1, -1, -1))
        out.length = self.length
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
