"""LocalAgreement: the part of a live hypothesis that two consecutive hypotheses share is shown as fixed.

A caption is rewritten every time recognition or translation runs again on more audio; showing each new guess whole
makes it flicker. Following LocalAgreement-2 (Macháček et al., "Turning Whisper into Real-Time Transcription
System", 2023), only the longest common prefix of the last two hypotheses is committed, and every later decode is
forced to start with what was committed, so fixed text never changes. Whisper hypotheses agree token by token;
translations word by word (character by character for Chinese, Japanese and Korean output).
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\s*\S+")
# CJK punctuation, kana, ideographs, Hangul, compatibility ideographs, full-width forms: written without spaces
CJK_CHARACTERS = r"\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CJK = re.compile(f"[{CJK_CHARACTERS}]")


def _agreed(a: list, b: list) -> int:
    """How many leading items the two lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def common_tokens(a: list[int], b: list[int]) -> list[int]:
    return a[:_agreed(a, b)]


def units(text: str) -> list[str]:
    """Words with their leading spaces, with CJK characters (and their punctuation) as single units."""
    out: list[str] = []
    for word in _WORD.findall(text):
        if _CJK.search(word):
            lead = word[:len(word) - len(word.lstrip())]
            chars = list(word.lstrip())
            out += [lead + chars[0], *chars[1:]]
        else:
            out.append(word)
    return out


def common_text(a: str, b: str) -> str:
    """The longest common prefix of two texts that ends on a whole word (or CJK character) of both."""
    ua, ub = units(a), units(b)
    n = _agreed(ua, ub)
    if n == len(ua) or n == len(ub):
        # the shorter text is a prefix of the longer, but its last word may be cut: "teach" / "teacher"
        shorter, longer = (ua, ub) if len(ua) <= len(ub) else (ub, ua)
        if n and n < len(longer) and not _CJK.search(shorter[n - 1]) and not longer[n].startswith((" ", "\t")):
            n -= 1
    return "".join(ua[:n])
