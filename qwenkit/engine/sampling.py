"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs.

Order follows vLLM and transformers: penalties and logit_bias on the raw logits, then temperature, then the
truncations, then a draw from a per-request torch.Generator (same seed, same tokens). Reported logprobs are those of
the model's raw distribution, before any of these transformations, as OpenAI-compatible servers report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from qwenkit.errors import BadRequest


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers-style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_types()
        checks = [
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("top_k", self.top_k >= -1, "must be >= -1 (0 or -1 disable it)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise BadRequest(f"{name} {why}, got {getattr(self, name)!r}")

    def _check_types(self) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        kinds = {
            "a number": ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"),
            "an integer": ("top_k", "top_logprobs"),
            "an integer or null": ("seed", "max_tokens"),
        }
        for kind, names in kinds.items():
            for name in names:
                v = getattr(self, name)
                ok = number(v) if kind == "a number" else integer(v) or (kind.endswith("null") and v is None)
                if not ok:
                    raise BadRequest(f"{name} must be {kind}, got {v!r}")
        if not isinstance(self.logprobs, bool):
            raise BadRequest(f"logprobs must be true or false, got {self.logprobs!r}")
        if not isinstance(self.stop, list):
            raise BadRequest(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(integer(t) and t >= 0 for t in self.stop_token_ids):
            raise BadRequest(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        bias = self.logit_bias
        if not isinstance(bias, dict) or not all(integer(k) and k >= 0 and number(v) and -100 <= v <= 100
                                                 for k, v in bias.items()):
            raise BadRequest("logit_bias must map token ids to numbers from -100 to 100")

    @classmethod
    def from_kwargs(cls, defaults: dict | None = None, **kwargs) -> SamplingParams:
        """Build from keyword arguments over model defaults (generation_config.json); unknown names are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise BadRequest(f"unknown sampling parameter(s): {', '.join(unknown)}")
        merged = {k: v for k, v in (defaults or {}).items() if k in known}
        merged.update({k: v for k, v in kwargs.items() if v is not None})
        return cls(**merged)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives (token id, logprob), best first


class Sampler:
    """Per-request sampling state: the seeded generator and the counts the penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int], constraint=None):
        self.params = params
        self.constraint = constraint  # qwenkit.engine.grammar.Constraint: masks tokens the grammar forbids
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.bias_ids = torch.tensor(sorted(params.logit_bias), dtype=torch.long)
        self.bias_values = torch.tensor([float(params.logit_bias[i]) for i in sorted(params.logit_bias)])
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        if prompt_ids:
            self.seen[torch.tensor(prompt_ids)] = True

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen.any():
            picked = logits[self.seen]
            logits[self.seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.frequency_penalty:
            logits -= p.frequency_penalty * self.output_counts
        if p.presence_penalty:
            logits -= p.presence_penalty * (self.output_counts > 0).float()
        return logits

    def __call__(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """logits [V] (fp32, raw) -> (token id, its logprob record if asked for)."""
        raw = logits.float()
        x = self._scores(raw)
        if self.params.greedy:
            token = int(torch.argmax(x))
        else:
            token = int(torch.multinomial(self.distribution(x), 1, generator=self.generator))
        return token, self._commit(raw, token)

    def check(self, logits: torch.Tensor, proposed: int, q: torch.Tensor | None) -> tuple[int, TokenLogprob | None]:
        """Speculative decoding: the token at a position where `proposed` was guessed, drawn so that the result
        follows this sampler's distribution p exactly whatever the guess (Leviathan et al. 2023): the guess is kept
        with probability min(1, p/q), else a token is drawn from max(p - q, 0) renormalised. q: the distribution
        the guess was drawn from ([V] probabilities), or None for a guess made without one (prompt lookup: q is
        then all on the guess). Greedy: the guess is kept when it is the argmax. -> (token, logprob record)."""
        if self.params.greedy:  # the argmax, whatever was guessed
            return self(logits)
        raw = logits.float()
        p = self.distribution(self._scores(raw))
        p = p / p.sum()  # top-p and min-p leave the kept mass short of 1
        if q is None:
            keep, residual = p[proposed], p.clone()
            residual[proposed] = 0.0
        else:
            keep = torch.clamp(p[proposed] / q[proposed], max=1.0)
            residual = (p - q).clamp_min_(0.0)
        if float(torch.rand((), generator=self.generator)) < float(keep):
            token = proposed
        else:  # a residual with no mass left (p == q up to rounding) can only happen where keep was 1
            token = int(torch.multinomial(residual if float(residual.sum()) > 0 else p, 1, generator=self.generator))
        return token, self._commit(raw, token)

    def _scores(self, raw: torch.Tensor) -> torch.Tensor:
        """The logits the draw is made from: penalties, logit_bias and the grammar's mask applied to a copy."""
        x = self.penalise(raw.clone())
        if self.bias_ids.numel():
            x[self.bias_ids] += self.bias_values
        if self.constraint is not None:
            self.constraint.mask(x)
        return x

    def distribution(self, x: torch.Tensor) -> torch.Tensor:
        """Sampling weights [V] from scores: temperature, then top-k, top-p and min-p (the tokens top-p and min-p
        drop are zeroed, the rest not renormalised: torch.multinomial does not need it)."""
        p = self.params
        x = x / p.temperature
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (always at least the top token).
            drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs

    def _commit(self, raw: torch.Tensor, token: int) -> TokenLogprob | None:
        """The token is the answer's next: count it for the penalties, advance the grammar, report its logprob."""
        self.output_counts[token] += 1
        self.seen[token] = True
        if self.constraint is not None:
            self.constraint.accept(token)
        return self._logprob(raw, token) if self.params.logprobs else None

    def _logprob(self, raw: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = torch.log_softmax(raw, dim=-1)
        top: list[tuple[int, float]] = []
        if self.params.top_logprobs:
            values, ids = torch.topk(logprobs, self.params.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logprobs[token]), top)
