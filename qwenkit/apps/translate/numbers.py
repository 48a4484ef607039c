"""Numbers in Mandarin text, and whether a translation into English carried them over.

A caption that drops or changes a number ("会议下午三点开始" -> "The meeting starts in the afternoon") misleads the reader
more than a clumsy phrase does. `missing_numbers(source, translation)` lists the numbers of the source that the
English does not show, in any of the forms English writes them: digits ("3"), words ("three"), ordinals ("third",
"3rd"), and, where the Chinese names a month or a weekday by its number (三月, 星期三), the name ("March",
"Wednesday").

Only numbers that are surely numbers are checked: digit runs, and runs of Chinese numerals worth two or more
outside the fixed words that merely contain a numeral (一起, 十分, 千万, 三明治...). A lone 一 is not checked: it is
"a", "one", "once" or part of a word far more often than a count the reader needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000, "亿": 100_000_000}
_RUN = re.compile(r"\d+(?:\.\d+)?|[零〇一二两三四五六七八九十百千万亿]+")
# Words that contain numerals but are no number the reader needs carried over.
_FIXED = ("十分", "千万", "万万", "万一", "一些", "一样", "一起", "一直", "一定", "一般", "一切", "一边", "一下", "一点",
          "一会", "一共", "一向", "一再", "统一", "唯一", "三明治", "四处", "五颜六色", "七上八下", "乱七八糟", "一五一十",
          "九牛一毛", "十全十美", "三心二意", "四面八方", "千方百计", "百分之", "七嘴八舌", "万事", "百货", "十足", "再三")
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh", 8: "eighth",
             9: "ninth", 10: "tenth", 11: "eleventh", 12: "twelfth", 20: "twentieth", 30: "thirtieth"}
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


@dataclass(frozen=True)
class Number:
    text: str  # as the source writes it: "三", "25", "二〇二六"
    value: float
    forms: tuple[str, ...]  # what an English translation may write instead, lower case

    def shown_in(self, english: str) -> bool:
        low = english.lower().replace(",", "")
        return any(re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", low) for f in self.forms)


def chinese_value(run: str) -> float:
    """The value of a run of Chinese numerals (二十五 -> 25, 两千 -> 2000, 二〇二六 -> 2026)."""
    if all(ch in _DIGITS for ch in run):  # read digit by digit: a year or a room number
        return float(int("".join(str(_DIGITS[ch]) for ch in run))) if len(run) > 1 else float(_DIGITS[run])
    total, section, digit = 0, 0, None
    for ch in run:
        if ch in _DIGITS:
            digit = _DIGITS[ch]
        elif ch in ("万", "亿"):
            section = (section + (digit or 0)) or 1
            total, section, digit = (total + section) * _UNITS[ch], 0, None
        else:
            section += (1 if digit is None else digit) * _UNITS[ch]  # 十五: a ten with no digit before it
            digit = None
    return float(total + section + (digit or 0))


def numbers_in(text: str) -> list[Number]:
    """The numbers of Mandarin text that a translation must carry over."""
    found = []
    for m in _RUN.finditer(text):
        run, start, end = m.group(), m.start(), m.end()
        if any(_overlaps(text, word, start, end) for word in _FIXED):
            continue
        if run[0].isdigit():
            value = float(run)
        else:
            if any(a in _DIGITS and b in _DIGITS and _DIGITS[b] == _DIGITS[a] + 1 for a, b in pairwise(run)):
                continue  # 三四个, 五六百: "three or four", a guess, not a number
            if text[end:end + 1] == "几" or text[start - 1:start] == "几":
                continue  # 十几, 几十: "a dozen or so"
            if text[end:end + 1] == "折":
                continue  # 打八折: "20% off", a discount English writes with another number
            if run in ("一", "零", "〇"):
                continue
            value = chinese_value(run)
        found.append(Number(run, value, _forms(value, text[start - 2:start], text[end:end + 1])))
    return found


def missing_numbers(source: str, translation: str) -> list[Number]:
    """The numbers of `source` (Mandarin) that `translation` (English) does not show in any form."""
    return [n for n in numbers_in(source) if not n.shown_in(translation)]


def _overlaps(text: str, word: str, start: int, end: int) -> bool:
    """Whether `word` occurs in `text` over any of text[start:end] (the first place it could start is searched)."""
    at = text.find(word, max(0, start - len(word) + 1))
    return 0 <= at < end and at + len(word) > start


def _forms(value: float, before: str, after: str) -> tuple[str, ...]:
    if value != int(value):
        return (f"{value:g}",)
    n = int(value)
    forms = [str(n), _words(n)]
    if n in _ORDINALS:
        forms.append(_ORDINALS[n])
    forms.append(f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}")
    if after == "月" and 1 <= n <= 12:
        forms.append(_MONTHS[n - 1].lower())
    if before.endswith(("周", "星期", "礼拜")) and 1 <= n <= 6:
        forms.append(_WEEKDAYS[n - 1].lower())
    if n == 2:
        forms += ["both", "couple", "pair", "twice", "double"]
    if n == 12:
        forms.append("dozen")
    if n == 100:
        forms.append("hundred")
    if n == 1000:
        forms.append("thousand")
    return tuple(dict.fromkeys(f for f in forms if f))


def _words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000 and n % 100 == 0:
        return f"{_ONES[n // 100]} hundred"
    if n < 1_000_000 and n % 1000 == 0 and n // 1000 < 100:
        return f"{_words(n // 1000)} thousand"
    return str(n)
