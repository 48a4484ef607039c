"""Speculative decoding: cheap guesses of the next few tokens, checked by the target model in one pass.

Decoding on a CPU is bound by memory: every step reads all the weights, whether it computes one token or four
(the block kernels take up to four rows per pass over a weight row). So a sequence that has a guess of k tokens
runs its last token and the k guesses through the target in one step, on the same row kernels as plain decoding
(qwenkit.engine.runner), and keeps the guesses the target agrees with plus one token of the target's own:
- greedy: a guess is kept while it is the target's argmax, so the text is exactly the text without speculation;
- sampled: each guess is kept or replaced by rejection sampling (qwenkit.engine.sampling.Sampler.check), so the
  text follows the target's distribution exactly, and a seeded request repeats exactly.
The keys and values of rejected guesses are dropped (the scheduler rolls the sequence back and frees their blocks).

Guesses come from prompt lookup (qwenkit.engine.lookup: free) or a draft model (qwenkit.engine.drafter). How many
tokens a sequence guesses adapts to what it had accepted; one whose guesses keep failing stops guessing for a
while, longer each time. All of this depends only on the sequence's own history, so a request gives the same text
alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwenkit.engine.lookup import NgramIndex
from qwenkit.errors import BadConfig

if TYPE_CHECKING:
    from qwenkit.engine.scheduler import Sequence

MAX_GUESS = 16


@dataclass
class Speculation:
    """What guesses tokens for the engine: a draft model, prompt lookup, or both (lookup first: it is free)."""

    draft: torch.nn.Module | None = None  # the draft network (a loaded qwenkit Model's .model), same vocabulary
    lookup: int = 0  # prompt lookup guesses up to this many tokens a step (0: off)
    draft_tokens: int = 4  # the draft model guesses up to this many tokens a step

    def __post_init__(self) -> None:
        for name in ("lookup", "draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= MAX_GUESS:
                raise BadConfig(f"{name} must be an integer from 0 to {MAX_GUESS}, got {value!r}")
        if self.draft is None and not self.lookup:
            raise BadConfig("speculation needs a draft model or lookup > 0")

    @property
    def longest(self) -> int:
        return max(self.lookup, self.draft_tokens if self.draft is not None else 0)


def check_vocabulary(target_tokenizer, draft_tokenizer, draft_name: str) -> None:
    """A draft must tokenize as the target does: its guesses are token ids of the target's vocabulary."""
    a = target_tokenizer.backend.get_vocab(with_added_tokens=True)
    b = draft_tokenizer.backend.get_vocab(with_added_tokens=True)
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise BadConfig(f"draft model {draft_name}: its vocabulary differs from the target's ({len(b)} against "
                        f"{len(a)} tokens; first differences: {', '.join(f'{t!r}={i}' for t, i in differ)}); "
                        "a draft must be a model of the same family and tokenizer")


START_PAUSE = 8  # target steps a sequence stops guessing after MISSES guesses in a row found nothing kept
MAX_PAUSE = 256
MISSES = 3


class SpecState:
    """One sequence's speculation: how many tokens it guesses next, its pauses, and what was kept."""

    def __init__(self, longest: int, lookup: bool):
        self.longest = self.length = longest
        self.ngrams = NgramIndex() if lookup else None
        self.misses = self.paused = 0
        self.pause = START_PAUSE
        self.proposed = self.accepted = 0  # guessed tokens, and of those kept

    def wanted(self, room: int) -> int:
        """Tokens to guess this step (room: how many more the sequence may take after the target's own)."""
        if self.paused:
            self.paused -= 1
            return 0
        return max(0, min(self.length, room))

    def record(self, proposed: int, accepted: int) -> None:
        """A guess of `proposed` tokens of which the first `accepted` were kept."""
        if not proposed:
            return
        self.proposed += proposed
        self.accepted += accepted
        # Longer after a guess kept whole, shorter after one cut short (as transformers' assisted generation).
        self.length = min(self.length + 1, self.longest) if accepted == proposed else max(1, self.length - 1)
        if accepted:
            self.misses = 0
            if 2 * accepted >= proposed:
                self.pause = START_PAUSE
            return
        self.misses += 1
        if self.misses >= MISSES:
            self.paused, self.pause, self.misses = self.pause, min(2 * self.pause, MAX_PAUSE), 0


class Proposer:
    """Guesses for the sequences of one step: prompt lookup where it finds a match, else the draft model."""

    def __init__(self, spec: Speculation, *, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 vocab_size: int):
        from qwenkit.engine.drafter import DraftModel

        self.spec = spec
        self.draft = None if spec.draft is None else DraftModel(
            spec.draft, num_blocks=num_blocks, block_size=block_size, kv_dtype=kv_dtype, target_vocab=vocab_size)

    def new_state(self) -> SpecState:
        return SpecState(self.spec.longest, lookup=self.spec.lookup > 0)

    def propose(self, wants: list[tuple[Sequence, int]]) -> None:
        """Set each sequence's `draft` (guessed tokens) and `draft_q` (the distributions they were drawn from, or
        None where a guess had none: lookup, greedy)."""
        by_model = []
        for seq, k in wants:
            guess = seq.spec.ngrams.propose(seq.tokens, min(k, self.spec.lookup)) if seq.spec.ngrams else []
            if guess:
                seq.draft, seq.draft_q = guess, None
            elif self.draft is not None:
                by_model.append((seq, min(k, self.spec.draft_tokens)))
        if by_model:
            for (seq, _), (tokens, qs) in zip(by_model, self.draft.propose(by_model)):
                seq.draft, seq.draft_q = tokens, qs if any(q is not None for q in qs) else None

    def forget(self, seq: Sequence) -> None:
        if self.draft is not None:
            self.draft.forget(seq)


def verify(sampler, logits: torch.Tensor, guess: list[int], qs: list[torch.Tensor | None] | None) -> list:
    """The tokens a step gives a sequence that guessed: logits [k + 1, V] of its last token and its k guessed
    tokens -> [(token, logprob record)]: the guesses the target keeps, up to the first it replaces, then one token
    of the target's own (the replacement, or the token after a guess kept whole)."""
    out = []
    for i, proposed in enumerate(guess):
        token, logprob = sampler.check(logits[i], proposed, qs[i] if qs else None)
        out.append((token, logprob))
        if token != proposed:
            return out
    out.append(sampler(logits[len(guess)]))
    return out
