"""Prompt lookup: guess the next tokens by finding the text's last few tokens earlier in the prompt or the answer.

A translation with a glossary, a code edit that returns the file, an answer that quotes a tool's result: much of
what the model writes was already written. The guess is what followed the most recent earlier occurrence of the
longest suffix (MAX_NGRAM tokens down to MIN_NGRAM) of the tokens so far. It costs no model, only a dictionary
lookup per step; the target model then checks the guess (qwenkit.engine.speculative).
"""

from __future__ import annotations

MAX_NGRAM = 4
MIN_NGRAM = 2  # a single token recurs too often to predict what follows it


class NgramIndex:
    """For each n-gram of a growing token list, where the tokens after its most recent occurrence begin.

    The index lags the list by one token, so the list's own last n-gram is never found as its own match.
    """

    def __init__(self, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM):
        self.max_n, self.min_n = max_n, min_n
        self.after: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in `after`

    def _catch_up(self, tokens: list[int], upto: int) -> None:
        """Index the n-grams tokens[end - n:end] for every end up to `upto`."""
        for end in range(max(self.indexed + 1, self.min_n), upto + 1):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.after[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, upto)

    def propose(self, tokens: list[int], count: int) -> list[int]:
        """Up to `count` tokens that followed the longest earlier occurrence of the list's last n-gram ([] when
        none). `tokens` must extend the list given before (tokens are only ever appended)."""
        self._catch_up(tokens, len(tokens) - 1)
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            start = self.after.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + count]
        return []
