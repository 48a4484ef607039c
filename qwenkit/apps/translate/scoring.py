"""Scoring captions against references: which caption belongs to which clip, and the character error rate.

A stream made of several clips is captioned by utterance, and the VAD may split a clip in two or join two; each
final caption goes to the clip its time span overlaps most, and a clip's hypothesis is its captions in order.
CER compares characters after writing both sides in simplified script without punctuation or spaces (Whisper
punctuates freely and mixes scripts), as Chinese ASR results are usually reported.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from functools import cache

from qwenkit.apps.translate.captioner import Caption


@cache
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def normalize_zh(text: str) -> str:
    text = _t2s().convert(unicodedata.normalize("NFKC", text))
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "Z", "S", "C")))


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total edits over total reference characters (normalized as above)."""
    edits = chars = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = normalize_zh(ref), normalize_zh(hyp)
        edits += edit_distance(r, h)
        chars += len(r)
    return edits / max(1, chars)


def assign(captions: Sequence[Caption], spans: Sequence[tuple[float, float]]) -> list[list[Caption]]:
    """Final captions grouped by the clip (start, end) each overlaps most; captions touching no clip are dropped."""
    groups: list[list[Caption]] = [[] for _ in spans]
    for caption in captions:
        if not caption.final:
            continue
        overlaps = [min(caption.end, e) - max(caption.start, s) for s, e in spans]
        best = max(range(len(spans)), key=overlaps.__getitem__) if spans else -1
        if best >= 0 and overlaps[best] > 0:
            groups[best].append(caption)
    return groups


def joined(group: Sequence[Caption], field: str) -> str:
    sep = "" if field == "source" else " "
    return sep.join(getattr(c, field) for c in group if getattr(c, field)).strip()
