"""A real tiny model whose output is forced: it runs (so every KV cache fills as usual) but its logits pick `script`
in order. Lets tests drive generation through text they choose: stop strings across tokens, split UTF-8, tags.
"""

from __future__ import annotations

import copy

import torch


class ScriptedLM:
    """Wraps a real model. Only forward passes that return logits consume the script: the serving engine may
    prefill a prompt in several chunks whose passes return no rows."""

    def __init__(self, lm, script: list[int]):
        self.lm, self.script, self.config, self.step = lm, list(script), lm.config, 0

    @property
    def dtype(self):
        return self.lm.dtype

    def __call__(self, input_ids, cache=None, logits="all"):
        out = self.lm(input_ids, cache=cache, logits=logits)
        return out if logits == "none" else self._force(out)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (the engine's runner asks for them apart from the forward pass)."""
        return self._force(self.lm.head(hidden))

    def _force(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[-2 if out.dim() == 3 else 0] == 0:
            return out
        forced = torch.full_like(out, -30.0)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 30.0
        self.step += 1
        return forced


def scripted(model, script: list[int]):
    """A shallow copy of a loaded Model whose network emits `script` (greedy) regardless of the prompt."""
    clone = copy.copy(model)
    clone.model = ScriptedLM(model.model, script)
    clone._engine = None  # its own engine, over the scripted network, starts on first use
    return clone
