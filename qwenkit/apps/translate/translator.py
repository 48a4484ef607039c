"""Translation with a Qwen model behind any chat client (qwenkit.Client: on-device, a server, or a route file).

One short system prompt names the two languages; for Mandarin into English, three worked examples follow it and the
text is framed as something to translate (a small model otherwise answers questions instead of translating them).
Glossary entries whose source term occurs in the text are added, so names and product terms come out as the user
wants; so are the people's names found in Mandarin text, in pinyin (qwenkit.apps.translate.names). The prompt is
the same for every sentence without such terms, so the serving engine's prefix cache holds it and each sentence
costs only its own tokens.

Each translation is checked against its source, and asked once more when the check fails: a question that came
back as a statement (again told that it is a question and, from Mandarin, begun with its question word's English:
"这个字怎么写？" -> "How ..."), a glossary term left out (begun with it where the text begins with it), a number
of the Mandarin missing from the English (told which numbers to keep; qwenkit.apps.translate.numbers).

`translate(text, prefix=...)` continues an answer that must start with `prefix` (the part of a live caption
already on screen), sent as a final assistant message with continue_final_message: the model writes what follows.

Into a language not written in Chinese characters, a small model sometimes copies a term it does not know
("He trains the田径."). Given a Qwen tokenizer (`vocabulary`: the whole Qwen family shares one), the translator then
asks again from just before the copied term, with those characters' tokens banned through OpenAI's logit_bias, so
the model writes its next best guess in the target language (at most MAX_RETRIES times).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qwenkit.apps.backend import DeviceNotice
from qwenkit.apps.translate.agreement import CJK_CHARACTERS
from qwenkit.apps.translate import names
from qwenkit.apps.translate.numbers import missing_numbers
from qwenkit.errors import BadData, QwenkitError

log = logging.getLogger("qwenkit.translate")

LANGUAGES = {
    "zh": "Mandarin Chinese", "en": "English", "ja": "Japanese", "ko": "Korean", "fr": "French", "de": "German",
    "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ru": "Russian", "ar": "Arabic", "vi": "Vietnamese",
    "th": "Thai", "id": "Indonesian", "nl": "Dutch", "tr": "Turkish", "pl": "Polish", "yue": "Cantonese",
}
# What the model is asked to write, where the spoken name is not the written one.
WRITTEN = {"yue": "Traditional Chinese"}
# Into Chinese, the instruction is given in Chinese: asked in English, Qwen2.5-Coder-0.5B tends to announce its
# translation ("翻译成简化的中文是：...") instead of giving it.
IN_CHINESE = {"en": "英文", "ja": "日文", "ko": "韩文", "fr": "法文", "de": "德文", "es": "西班牙文", "it": "意大利文",
              "pt": "葡萄牙文", "ru": "俄文", "ar": "阿拉伯文", "vi": "越南文", "th": "泰文", "id": "印尼文",
              "nl": "荷兰文", "tr": "土耳其文", "pl": "波兰文", "yue": "粤语"}


class ChatClient(Protocol):
    def chat(self, messages: list[dict], *, stream: bool = False, **params: Any) -> Any: ...


class TranslationError(QwenkitError):
    """The model behind the translator failed (every backend of a route included)."""


@dataclass(frozen=True)
class Term:
    source: str
    target: str


def language_name(code: str) -> str:
    try:
        return LANGUAGES[code]
    except KeyError:
        raise BadData(f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGES))}") from None


def system_prompt(source: str, target: str) -> str:
    """The translator's instruction (also what scripts/hsk_tune_data.py trains an adapter with)."""
    if target == "zh" and source in IN_CHINESE:
        return f"把用户的{IN_CHINESE[source]}翻译成自然的简体中文。只输出译文。"
    return (f"Translate the user's {language_name(source)} into natural {WRITTEN.get(target, language_name(target))}. "
            "Reply with the translation only.")


# Worked examples sent before the text, written for this purpose (none is an HSK benchmark sentence). Without them
# Qwen2.5-Coder-0.5B takes a question as addressed to itself and answers it: 3 of 43 Chinese questions came back
# as questions, "这个字怎么写？" as 'This word should be written as "this".'; with them and the text framed as
# something to translate, 57 of the 63 questions of the tuning split stay questions, and chrF on the 180 clips'
# gold text rises from 49.3 to 50.7. Only where they were measured: Mandarin into English.
EXAMPLES: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("zh", "en"): [("你明天有空吗？", "Are you free tomorrow?"), ("我们在哪儿见面？", "Where shall we meet?"),
                   ("他每天骑自行车上班。", "He rides his bike to work every day.")],
}
QUESTION_HINT = " The text is a question: translate it as a question, do not answer it."
_QUESTION_MARKS = ("?", "？")
# How an English question asking what the Chinese one asks begins, by its question word (first match wins, so the
# longer words come first): a second try starts the translation with it when the first came back as an answer.
OPENERS = (("为什么", "Why"), ("怎么这么", "Why"), ("怎么那么", "Why"), ("什么时候", "When"), ("什么样", "What kind of"),
           ("什么地方", "Where"), ("哪儿", "Where"), ("哪里", "Where"), ("在哪", "Where"), ("谁", "Who"),
           ("多少钱", "How much"), ("多少", "How many"), ("几点", "What time"), ("几岁", "How old"), ("怎么", "How"),
           ("什么", "What"), ("哪", "Which"))


def question_opener(text: str) -> str:
    """The English opening of a Mandarin question's translation ('' for a yes/no question or none found)."""
    return next((english for word, english in OPENERS if word in text), "")


def framed(text: str, target: str, terms: str = "") -> str:
    """The user turn for a pair with worked examples: the text marked as something to translate (and the glossary
    terms it contains, right beside it: in the system prompt alone, after the examples, the model drops them)."""
    return f"Translate into {WRITTEN.get(target, language_name(target))}{terms}:\n{text}"


def prompt_messages(source: str, target: str, text: str, system: str | None = None, terms: str = "",
                    examples: bool = True) -> list[dict]:
    """The chat a translation is asked with: the system prompt, the pair's worked examples if it has any (and
    `examples` is true: an adapter tuned on the plain prompt, as scripts/hsk_tune_data.py writes it, is asked
    without), then the text. `terms`: ", with A = B; C = D" for a pair with examples (the glossary is in `system`
    otherwise)."""
    messages = [{"role": "system", "content": system or system_prompt(source, target)}]
    examples = EXAMPLES.get((source, target)) if examples else None
    if not examples:
        return messages + [{"role": "user", "content": text}]
    for example, translation in examples:
        messages += [{"role": "user", "content": framed(example, target)},
                     {"role": "assistant", "content": translation}]
    return messages + [{"role": "user", "content": framed(text, target, terms)}]


def read_glossary(path: str | Path) -> list[Term]:
    """Terms from a file: a JSON object {"source": "target"}, or lines `source<TAB>target` / `source = target`
    (blank lines and lines starting with # are skipped). Errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadData(f"{path}: cannot read the glossary ({e})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BadData(f"{path}: invalid JSON ({e})") from None
        if not all(isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip() for k, v in data.items()):
            raise BadData(f"{path}: a JSON glossary maps non-empty source strings to non-empty target strings")
        return [Term(k.strip(), v.strip()) for k, v in data.items()]
    terms = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        source, sep, target = line.partition("\t") if "\t" in line else line.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise BadData(f"{path}:{number}: expected `source<TAB>target` or `source = target`, got {line!r}")
        terms.append(Term(source.strip(), target.strip()))
    return terms


class Translator:
    """Text in one language to another through `chat` (greedy by default, so a sentence always reads the same)."""

    def __init__(self, chat: ChatClient, source: str = "zh", target: str = "en", *,
                 glossary: Iterable[Term] = (), model: str | None = None, temperature: float = 0.0,
                 max_tokens: int | None = None, vocabulary: Any = None, examples: bool = True):
        if source == target:
            raise BadData(f"source and target language are both {source!r}")
        self.chat, self.source, self.target = chat, source, target
        self.glossary = list(glossary)
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.vocabulary = vocabulary if target not in CJK_TARGETS else None  # None: no guard against copied terms
        self.system = system_prompt(source, target)
        # False for an adapter tuned on the plain prompt (scripts/hsk_tune_data.py): it is asked as it learned
        self.examples = examples
        self.retries = 0  # guarded re-asks so far
        self.where = DeviceNotice(chat)
        # people's names are looked for in Mandarin going into a language written in Latin letters (pinyin)
        self.finds_names = source == "zh" and target not in CJK_TARGETS
        if self.finds_names:
            names.preload()

    def terms(self, text: str) -> list[Term]:
        """The glossary terms `text` contains, then the people's names found in it (Mandarin into a language
        written in Latin letters: "王小明" = "Wang Xiaoming"), unless the glossary already names them."""
        hits = [t for t in self.glossary if t.source.lower() in text.lower()]
        if self.finds_names:
            hits += [Term(name, english) for name, english in names.find_names(text)
                     if not any(name in t.source or t.source in name for t in hits)]
        return hits

    def messages(self, text: str, hint: str = "") -> list[dict]:
        system, terms = self.system + hint, ""
        hits = self.terms(text)
        if hits:
            pairs = "; ".join(f"{t.source} = {t.target}" for t in hits)
            system += f" Translate these terms exactly as given: {pairs}."
            terms = f", with {pairs}"
        return prompt_messages(self.source, self.target, text, system, terms, self.examples)

    def budget(self, text: str) -> int:
        """Enough tokens for a translation of `text`, not enough for a runaway answer."""
        return self.max_tokens or min(512, 24 + 3 * len(text))

    def translate(self, text: str, prefix: str = "") -> str:
        """The translation of `text`, starting with `prefix` when one is given. Empty text gives ''."""
        text = text.strip()
        if not text:
            return ""
        out = self._ask(text, prefix, {})
        out = self._as_question(text, prefix, out)
        out = self._with_terms(text, prefix, out)
        out = self._with_numbers(text, prefix, out)
        return self._without_copied_terms(text, prefix, out)

    def _as_question(self, text: str, prefix: str, out: str) -> str:
        """A question that came back as an answer is asked once more, told that the text is a question and (from
        Mandarin, before any of the caption is fixed) with the translation begun as the question begins."""
        if not text.endswith(_QUESTION_MARKS) or out.endswith(_QUESTION_MARKS) or self.target in CJK_TARGETS:
            return out
        self.retries += 1
        opener = question_opener(text) if self.source == "zh" and not prefix else ""
        again = self._ask(text, prefix or opener, {}, hint=QUESTION_HINT)
        return again if again.endswith(_QUESTION_MARKS) else out

    def _with_terms(self, text: str, prefix: str, out: str) -> str:
        """A glossary term left out: asked once more, begun with it where the text begins with it."""
        missing = self._missing_terms(text, out)
        if not missing:
            return out
        self.retries += 1
        first = missing[0]
        start = first.target if not prefix and text.startswith(first.source) else prefix
        again = self._ask(text, start, {}, hint=" Keep these terms exactly as given.")
        return again if len(self._missing_terms(text, again)) < len(missing) else out

    def _with_numbers(self, text: str, prefix: str, out: str) -> str:
        """A number of the Mandarin left out of the English (in digits, words, ordinals, month or weekday names):
        asked once more, told which numbers to keep."""
        if (self.source, self.target) != ("zh", "en"):
            return out
        missing = missing_numbers(text, out)
        if not missing:
            return out
        self.retries += 1
        keep = ", ".join(f"{n.text} = {n.forms[0]}" for n in missing)
        again = self._ask(text, prefix, {}, hint=f" Keep every number: {keep}.")
        return again if len(missing_numbers(text, again)) < len(missing) else out

    def _without_copied_terms(self, text: str, prefix: str, out: str) -> str:
        """Chinese characters copied into a non-CJK target: asked again from just before them, their tokens
        banned (needs the vocabulary; at most MAX_RETRIES times)."""
        banned: dict[str, float] = {}
        for _ in range(MAX_RETRIES if self.vocabulary is not None else 0):
            leak = _CJK.search(out, len(prefix))
            if leak is None:
                break
            self.retries += 1
            for form in (leak.group(), " " + leak.group()):
                banned.update({str(t): -100.0 for t in self.vocabulary.encode(form)})
            out = self._ask(text, out[:leak.start()], banned)
        return out

    def _missing_terms(self, text: str, out: str) -> list[Term]:
        return [t for t in self.terms(text) if t.target.lower() not in out.lower()]

    def _ask(self, text: str, prefix: str, logit_bias: dict[str, float], hint: str = "") -> str:
        messages = self.messages(text, hint)
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.budget(text),
                                  "stop": ["\n\n"]}
        if self.model is not None:
            params["model"] = self.model
        if logit_bias:
            params["logit_bias"] = logit_bias
        if prefix:
            messages.append({"role": "assistant", "content": prefix})
            params.update(add_generation_prompt=False, continue_final_message=True)
        try:
            reply = self.chat.chat(messages, stream=False, **params)
        except Exception as e:  # a route whose every backend failed, a server that went away, a refused request
            raise TranslationError(f"translation failed: {e}") from e
        notice = self.where.update(reply.get("qwenkit_backends") or []) if isinstance(reply, dict) else None
        if notice:
            log.warning("%s", notice)
        content = _content(reply)
        return clean(prefix + content if prefix else content, keep=prefix)


def _content(reply: Any) -> str:
    if isinstance(reply, dict):
        if "error" in reply:
            raise TranslationError(f"translation failed: {reply['error']}")
        return reply["choices"][0]["message"].get("content") or ""
    return getattr(reply, "text", "") or ""


_CJK = re.compile(f"[{CJK_CHARACTERS}]+")
CJK_TARGETS = {"zh", "yue", "ja", "ko"}
MAX_RETRIES = 3


_QUOTES = {'"': '"', "“": "”", "「": "」", "'": "'"}


def clean(text: str, keep: str = "") -> str:
    """One caption line: the first non-empty line, without quotes the model wrapped around the whole of it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    out = lines[0] if lines else ""
    if keep and not out.startswith(keep.strip()):
        out = keep.strip()  # the model broke the line right after the fixed part
    if len(out) > 1 and out[0] in _QUOTES and out.endswith(_QUOTES[out[0]]) and not keep:
        out = out[1:-1].strip()
    return re.sub(r"\s+", " ", out)
