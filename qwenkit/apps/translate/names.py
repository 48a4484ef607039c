"""People's names in Mandarin text, and how English writes them (pinyin), so that a translation keeps them.

Without help, Qwen2.5-Coder-0.5B drops a name it cannot place: "王小明是我的朋友。" came back as "He is my friend.".
The translator gives the names it finds here as terms beside the text ("王小明 = Wang Xiaoming"), as it does with a
user's glossary, and asks again when a translation leaves one out.

Names are found by jieba's part-of-speech tagger (tag `nr`), which on its own also tags everyday words (谢谢, 安静,
阳光: 177 of the 4354 HSK sentences had such a "name", where 2 had a real one). A tagged word counts only when it
starts with a common surname and is not an everyday word (jieba's own word frequencies), with the titles and
prefixes that go with names read as English writes them: 王先生 -> "Mr. Wang", 小王 -> "Xiao Wang", 李老师 ->
"Teacher Li". Of the 4354 sentences, that finds 王先生 and 李主任, and no everyday word.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any

# The 100 most common surnames (single characters; the compound ones are rare in speech to translate).
SURNAMES = frozenset("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
                     "姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
# Titles after a surname, and how English puts them before it.
TITLES = {"先生": "Mr.", "太太": "Mrs.", "小姐": "Miss", "女士": "Ms.", "老师": "Teacher", "经理": "Manager",
          "医生": "Dr.", "大夫": "Dr.", "主任": "Director", "教授": "Professor", "校长": "Principal", "阿姨": "Aunt",
          "叔叔": "Uncle", "师傅": "Master"}
PREFIXES = {"小": "Xiao", "老": "Lao"}  # 小王, 老李: a familiar form of the surname
_EVERYDAY = 50  # jieba frequency above which a tagged word is a common word, not a name
_EVERYDAY_GIVEN = 100  # ... and above which a three-character word's last two are a word (戴眼镜), not a given name
_NOT_IN_NAMES = set("和的了里在是有向到从对把被上下中")  # function characters: 金和银, 汤里 are no names
_COUNTED = set("这那哪几一每两二三四五六七八九十")  # before 张/马...: a measure word (这张卡), not a surname

_lock = threading.Lock()
_tagger: Any = None


@lru_cache(maxsize=256)  # a sentence asked again (a re-ask, a live caption's next partial) is tagged once
def find_names(text: str) -> tuple[tuple[str, str], ...]:
    """(name as written, its English) for each person's name in Mandarin `text`, in order, without repeats."""
    found: dict[str, str] = {}
    pos = 0
    tagged = _tag(text)
    for i, (word, flag) in enumerate(tagged):
        start = text.find(word, pos)
        pos = start + len(word)
        following = tagged[i + 1][0] if i + 1 < len(tagged) else ""
        if flag == "nr" and len(word) == 1 and following in TITLES:
            word += following  # 李 / 主任: the tagger split the surname from its title
        if flag == "nr" and word not in found:
            english = _english(word, text[start - 1:start] if start > 0 else "")
            if english:
                found[word] = english
    return tuple(found.items())


def _english(word: str, before: str) -> str:
    """How English writes a tagged word when it is a person's name, else ''."""
    core, title = word, ""
    for suffix, english in TITLES.items():
        if core.endswith(suffix) and len(core) > len(suffix):
            core, title = core[:-len(suffix)], english
            break
    prefix = PREFIXES.get(core[0], "") if len(core) == 2 and core[1] in SURNAMES else ""
    if prefix:
        core = core[1:]
    if (core[0] not in SURNAMES or len(core) > 3 or before in _COUNTED or _NOT_IN_NAMES & set(core)
            or not (title or prefix) and _frequency(word) > _EVERYDAY
            or len(core) == 3 and _frequency(core[1:]) > _EVERYDAY_GIVEN):
        return ""
    syllables = _pinyin(core)
    name = syllables[0].capitalize() + (" " + "".join(syllables[1:]).capitalize() if len(syllables) > 1 else "")
    return " ".join(p for p in (title, prefix, name) if p)


def preload() -> None:
    """Load the tagger on a background thread now, so that the first caption does not wait for it (about a second
    here; a sentence tagged before it is ready waits for it)."""
    threading.Thread(target=_load, name="qwenkit-names", daemon=True).start()


def _load() -> Any:
    global _tagger
    with _lock:  # jieba loads its dictionary on first use, once per process
        if _tagger is None:
            import jieba
            import jieba.posseg

            jieba.setLogLevel(logging.WARNING)
            jieba.initialize()
            _tagger = jieba
        return _tagger


def _tag(text: str) -> list[tuple[str, str]]:
    tagger = _load()
    with _lock:  # jieba's tagger keeps state between words: one sentence at a time
        return [(w.word, w.flag) for w in tagger.posseg.cut(text)]


def _frequency(word: str) -> int:
    return _tagger.dt.FREQ.get(word, 0)


def _pinyin(text: str) -> list[str]:
    from pypinyin import Style, lazy_pinyin

    return lazy_pinyin(text, style=Style.NORMAL)
