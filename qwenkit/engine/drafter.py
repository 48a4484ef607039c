"""The draft model of speculative decoding: a smaller Qwen with the target's vocabulary guesses the next tokens.

It runs in the engine's worker thread, on the same kernels as the target (qwenkit.engine.runner), with a paged KV
pool of its own. Each target sequence has a shadow here: the tokens the draft has seen and its blocks. Before a
guess the shadow catches up with the target's tokens (after a rejection, the draft's keys and values past the
first token that differs are dropped, as the target's are), then the draft decodes its guess one token a step,
every speculating sequence in the same step.

Sampled requests draw the guess from the draft's own distribution q (temperature, top-k, top-p and min-p as the
request asks, no penalties), with a generator of its own; the target then keeps or replaces each guessed token so
that the answer follows the target's distribution exactly (qwenkit.engine.sampling.Sampler.check).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from qwenkit.engine.paged import BlockPool
from qwenkit.engine.runner import ModelRunner
from qwenkit.engine.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from qwenkit.engine.scheduler import Sequence

CATCH_UP_CHUNK = 512  # rows per pass while the draft reads a new prompt
_SEED_SALT = 0x5EED_D4AF  # the draft's generator must not replay the target's random numbers


def draft_params(params: SamplingParams) -> SamplingParams:
    """What the draft samples with: the request's temperature and truncations, nothing that needs the output
    history (penalties), nothing reported. Its seed differs from the target's: the proof that the answer keeps the
    target's distribution needs the guess and the target's acceptance draws to be independent."""
    seed = None if params.seed is None else (params.seed ^ _SEED_SALT) & 0xFFFF_FFFF_FFFF
    return dataclasses.replace(params, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                               logit_bias={}, logprobs=False, top_logprobs=0, stop=[], stop_token_ids=[], seed=seed)


class _Shadow:
    """A target sequence as the draft sees it (the fields qwenkit.engine.runner and BlockPool read)."""

    def __init__(self, seq: Sequence, vocab_size: int):
        self.tokens: list[int] = []
        self.prompt_len = seq.prompt_len  # its prompt runs on the matrix kernels, as the target's does
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []
        self.computed = 0  # leading tokens whose keys and values are in the draft's pool
        self.known = 0  # leading tokens equal to the target's committed ones
        self.guess: list[int] = []  # this step's guessed tokens
        self.qs: list[torch.Tensor | None] = []  # the distribution each was drawn from (None when greedy)
        self.adapter, self.root, self.draft, self.mm = 0, b"", (), None
        self.sampler = Sampler(draft_params(seq.sampler.params), vocab_size, [])

    def key_tokens(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]

    def pick(self, logits: torch.Tensor, target_vocab: int) -> tuple[int, torch.Tensor | None]:
        """The next guessed token and the distribution it was drawn from (None when greedy), target-sized."""
        raw = logits.float()
        if self.sampler.params.greedy:
            return int(torch.argmax(raw)), None
        q = self.sampler.distribution(raw)
        token = int(torch.multinomial(q, 1, generator=self.sampler.generator))
        q = q / q.sum()
        if q.numel() < target_vocab:  # a draft with fewer embedding rows: the rest it never proposes
            q = torch.cat([q, q.new_zeros(target_vocab - q.numel())])
        return token, q[:target_vocab]


class DraftModel:
    def __init__(self, model, *, num_blocks: int, block_size: int, kv_dtype: torch.dtype, target_vocab: int):
        self.model, self.target_vocab = model, target_vocab
        self.pool = BlockPool(model.config, num_blocks, block_size, kv_dtype)
        self.runner = ModelRunner(model, self.pool)
        self.shadows: dict[int, _Shadow] = {}  # by id(target sequence)

    def forget(self, seq: Sequence) -> None:
        """The sequence left the engine (or was preempted): free its draft blocks."""
        shadow = self.shadows.pop(id(seq), None)
        if shadow is not None:
            self.pool.release(shadow.blocks)

    def propose(self, wants: list[tuple[Sequence, int]]) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        """For each (sequence, k): up to k guessed tokens after its committed tokens, and the distribution each was
        drawn from (None when greedy). Fewer, or none, when the draft's pool has no room."""
        shadows = []
        for seq, k in wants:
            shadow = self.shadows.get(id(seq))
            if shadow is None:
                shadow = self.shadows[id(seq)] = _Shadow(seq, self.model.config.vocab_size)
            self._sync(shadow, seq.tokens)
            shadow.guess, shadow.qs = [], []
            # keys and values for the tokens and all guesses but the last, which is never fed back
            shadows.append((shadow, k if self._reserve(shadow, len(seq.tokens) + k - 1) else 0))
        live = [(s, k) for s, k in shadows if k > 0]
        self._catch_up([s for s, _ in live])
        step = [(s, s.computed, len(s.tokens)) for s, _ in live]
        while step:
            for shadow, logits in self.runner.run(step):
                token, q = shadow.pick(logits[-1], self.target_vocab)
                shadow.guess.append(token)
                shadow.qs.append(q)
            for shadow, _, end in step:
                shadow.computed = end
            live = [(s, k) for s, k in live if len(s.guess) < k]
            for shadow, _ in live:
                shadow.tokens.append(shadow.guess[-1])
            step = [(s, len(s.tokens) - 1, len(s.tokens)) for s, _ in live]
        return [(s.guess, s.qs) for s, _ in shadows]

    # ---- the shadow's cache ------------------------------------------------------------------------------------
    def _sync(self, shadow: _Shadow, tokens: list[int]) -> None:
        """Take the target's committed tokens; keys and values past the first token that differs are stale."""
        same, end = shadow.known, min(len(shadow.tokens), len(tokens))
        while same < end and shadow.tokens[same] == tokens[same]:
            same += 1
        shadow.computed = min(shadow.computed, same)
        shadow.tokens[same:] = tokens[same:]  # the first `same` are equal already: copy only the rest
        shadow.known = len(tokens)
        if not shadow.blocks:  # a new sequence: its prompt may already be in the draft's prefix cache
            shadow.blocks, shadow.hashes = self.pool.match_prefix(tokens, len(tokens) - 1)
            shadow.computed = len(shadow.blocks) * self.pool.block_size
        self.pool.register_full_blocks(shadow)

    def _reserve(self, shadow: _Shadow, positions: int) -> bool:
        """Blocks for the first `positions` tokens, if the pool has them."""
        needed = -(-positions // self.pool.block_size) - len(shadow.blocks)
        if needed > self.pool.available:
            return False
        shadow.blocks += [self.pool.allocate() for _ in range(max(needed, 0))]
        return True

    def _catch_up(self, shadows: list[_Shadow]) -> None:
        """Run each shadow's unseen tokens but the last through the draft, a chunk at a time (a new prompt)."""
        while True:
            plan = [(s, s.computed, min(s.computed + CATCH_UP_CHUNK, len(s.tokens) - 1)) for s in shadows
                    if len(s.tokens) - 1 - s.computed > 0]
            if not plan:
                return
            self.runner.run(plan)
            for shadow, _, end in plan:
                shadow.computed = end
