"""One sequence through the engine's paged KV pool, step by step, for tests that feed their own tokens (teacher
forcing, parity with a reference): the prompt's rows on the matrix kernel and generated tokens on the row kernels,
as the engine's runner lays them out (qwenkit.engine.runner)."""

from __future__ import annotations

import torch

from qwenkit.quant.plan import default_kv_dtype
from qwenkit.engine.paged import BlockPool, PagedBatch
from qwenkit.quant.linear import decode_rows


class PagedSequence:
    def __init__(self, model, capacity: int, kv_dtype: torch.dtype | None = None, block_size: int = 16,
                 slots: torch.Tensor | None = None):
        blocks = -(-capacity // block_size)
        self.model, self.length = model, 0
        self.pool = BlockPool(model.config, blocks, block_size, kv_dtype or default_kv_dtype(model.dtype))
        self.slots = slots if slots is not None else torch.arange(blocks * block_size)

    def __call__(self, tokens: list[int], generated: bool = False, logits: str = "last") -> torch.Tensor:
        """Logits of `tokens` continuing the sequence: prompt tokens, or tokens the model generated."""
        first, end = self.length, self.length + len(tokens)
        batch = PagedBatch(self.pool, [(len(tokens), self.slots[:end])], torch.arange(first, end))
        with torch.inference_mode(), decode_rows(len(tokens) if generated else 0):
            out = self.model(torch.tensor([tokens]), cache=batch, logits="none" if logits == "last" else logits)
        self.length = end
        if logits != "last":
            return out
        with torch.inference_mode(), decode_rows(1):  # the engine's head: the sampled row, on the row kernels
            return self.model.head(out[:, -1])
