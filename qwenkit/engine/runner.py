"""One step of the model for the scheduler's plan: the flat batch, the forward pass, the samplers.

The scheduler decides which tokens of which sequences a step computes; the runner lays them out as one flat row of
tokens over the paged pool (qwenkit.engine.paged.PagedBatch), runs the model, and samples the next token of every
sequence whose pass reached the end of its known tokens.

Generated tokens come first in the flat batch and prompt tokens after them: quantized layers run the former on
their row kernels and the latter on the matrix kernel (qwenkit.quant.linear.decode_rows), so each token takes the
same kernel whether it is decoded alone, batched, in a prompt chunk of any size, or recomputed after a preemption.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from qwenkit.engine.fused import FusedLayers
from qwenkit.engine.paged import BlockPool, PagedBatch
from qwenkit.model.qwen import ImageRows
from qwenkit.model.vision import VisionFeatures
from qwenkit.quant.linear import decode_rows

if TYPE_CHECKING:
    from qwenkit.engine.adapters import AdapterSet
    from qwenkit.engine.scheduler import Sequence


class _Rows:
    """One kind of rows of the flat batch (generated or prompt tokens), gathered segment by segment."""

    def __init__(self):
        self.segments: list[tuple[int, torch.Tensor]] = []
        self.positions: list[torch.Tensor] = []
        self.rope: list[torch.Tensor] = []  # multimodal rotary positions [3, n] of each segment
        self.images: list[tuple[torch.Tensor, Sequence, torch.Tensor]] = []  # (rows here, seq, feature rows)
        self.ids: list[int] = []
        self.adapters: list[int] = []

    def add(self, seq: Sequence, first: int, end: int, slots: torch.Tensor) -> None:
        self.segments.append((end - first, slots[:end]))
        positions = torch.arange(first, end)
        self.positions.append(positions)
        if seq.mm is None:
            self.rope.append(positions.expand(3, -1))
        else:
            self.rope.append(seq.mm.rope(first, end))
            rows, features = seq.mm.image_rows(first, end)
            if len(rows):
                self.images.append((rows + len(self.ids), seq, features))
        self.ids += seq.tokens[first:end]
        self.adapters += [seq.adapter] * (end - first)


class ModelRunner:
    def __init__(self, model, pool: BlockPool, adapters: AdapterSet | None = None):
        self.model, self.pool, self.adapters = model, pool, adapters
        self._offsets = torch.arange(pool.block_size)
        self.fused = FusedLayers(pool) if pool.native else None

    def run(self, plan: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Compute tokens [first, end) of each planned sequence. -> (sequence, logits [r, V]) for each sequence
        whose pass reached its last known token, in plan order: r = 1, or 1 + k for a sequence whose last k tokens
        are guesses (`seq.draft`, speculative decoding), one row per guess and one after them."""
        generated, prompt = _Rows(), _Rows()
        last = []  # each planned sequence's last computed token: (a generated one?, its row within its kind)
        for seq, first, end in plan:
            table = torch.tensor(seq.blocks, dtype=torch.long)
            slots = (table[:, None] * self.pool.block_size + self._offsets).flatten()
            split = min(max(first, seq.prompt_len), end)  # tokens from prompt_len on are the model's own
            if first < split:
                prompt.add(seq, first, split, slots)
            if seq.draft:  # a decode step with guesses (all generated tokens): one segment per row, so each
                # attends exactly as in a decode step of its own (PyTorch's attention takes another path for a
                # segment of several rows)
                for row_end in range(first + 1, end + 1):
                    generated.add(seq, row_end - 1, row_end, slots)
            elif split < end:
                generated.add(seq, split, end, slots)
            last.append((split < end, len(generated.ids if split < end else prompt.ids) - 1))
        flat = [row if mine else len(generated.ids) + row for mine, row in last]
        sample = [(seq, row - len(seq.draft), row + 1) for (seq, _, end), row in zip(plan, flat)
                  if end == len(seq.tokens)]
        batch = PagedBatch(self.pool, generated.segments + prompt.segments,
                           torch.cat(generated.positions + prompt.positions),
                           fused=self.fused if not prompt.ids else None)  # generated rows only: row kernels
        ids = torch.tensor([generated.ids + prompt.ids])
        adapters = self.adapters.rows(torch.tensor(generated.adapters + prompt.adapters)) \
            if self.adapters is not None else contextlib.nullcontext()
        multimodal = {}
        if any(seq.mm is not None for seq, _, _ in plan):
            multimodal = dict(images=self._images(generated, prompt),
                              rope_positions=torch.cat(generated.rope + prompt.rope, dim=1)[:, None])
        with adapters, decode_rows(len(generated.ids)):
            hidden = self.model(ids, cache=batch, logits="none", **multimodal)[0]
        if not sample:
            return []
        # The head only for the rows that sample, all on the row kernels: a prompt's last token gets the same
        # logits whether it ends a long chunk or comes alone after a prefix-cache hit.
        rows = [r for _, first, end in sample for r in range(first, end)]
        with decode_rows(len(rows)):
            logits = self.model.head(hidden[rows])
        out, at = [], 0
        for seq, first, end in sample:
            out.append((seq, logits[at : at + end - first]))
            at += end - first
        return out

    def _images(self, generated: _Rows, prompt: _Rows) -> ImageRows | None:
        """The image features of this pass's image tokens, and their rows in the flat batch."""
        rows, embeds, deepstack = [], [], []
        for kind, offset in ((generated, 0), (prompt, len(generated.ids))):
            for here, seq, features in kind.images:
                encoded = seq.mm.encode(self.model.visual)
                rows.append(here + offset)
                embeds.append(encoded.embeds[features])
                deepstack.append([d[features] for d in encoded.deepstack])
        if not rows:
            return None
        layers = [torch.cat(per_layer) for per_layer in zip(*deepstack)]
        return ImageRows(torch.cat(rows), VisionFeatures(torch.cat(embeds), layers))
