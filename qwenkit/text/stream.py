"""Split a stream of generated tokens into reasoning, content and tool calls, by token id.

Qwen marks reasoning with `<think>`/`</think>` and tool calls with `<tool_call>`/`</tool_call>`; all four are single
added tokens (not "special": skip_special_tokens keeps them), so we switch state on their ids and never on text.
Feed every generated token with the text delta IncrementalDecoder produced for it:

    parser = StreamParser(tok, in_reasoning=prompt_opened_think)
    for token_id in generated:
        for event in parser.feed(token_id, decoder.push(token_id)):
            ...
    events = parser.feed(None, decoder.flush()) + parser.finish()   # None: text with no token of its own

Rules (every engine gets these edges wrong somewhere):
- a `<tool_call>` inside reasoning is still a tool call; reasoning resumes after it;
- several calls per reply; `{"name": "now"}` or `"arguments": {}` give arguments "{}"; arguments written as a
  JSON string holding an object are accepted; malformed ones give ToolCallError, never an exception;
- text is cut into segments by the tags and the start/end of the reply: a whitespace-only segment is never
  emitted; leading whitespace right after a tag (e.g. the "\\n\\n" after `</think>`) is dropped; whitespace at the end
  of a segment is held back until more text shows it is inner whitespace, dropped if a tag follows, emitted at
  finish(). Non-whitespace text is never delayed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "StreamParser",
    "ReasoningDelta",
    "ContentDelta",
    "ToolCall",
    "ToolCallError",
    "Event",
    "THINK_OPEN",
    "THINK_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete, well-formed call. index counts the well-formed calls of this reply (0, 1, ...), ready to be
    OpenAI's tool_calls[].index; arguments is JSON object text."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallError:
    """A `<tool_call>` block that is not a usable call. index is the block's position among all `<tool_call>`
    blocks of this reply (well-formed or not); raw is the text between the tags."""

    index: int
    raw: str
    message: str


Event = Union[ReasoningDelta, ContentDelta, ToolCall, ToolCallError]

_CONTENT, _REASONING, _TOOL = "content", "reasoning", "tool"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


class StreamParser:
    """Incremental parser of one reply. feed() per generated token, finish() once at the end. Never raises on
    model output."""

    def __init__(self, tokenizer: Any, *, in_reasoning: bool = False, seed: int | None = None) -> None:
        ids = {name: tokenizer.token_to_id(name) for name in (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)}
        self._tags: dict[int, str] = {tid: name for name, tid in ids.items() if tid is not None}
        self._rng = random.Random(seed)  # seed None: seeded from os.urandom
        self._mode = _REASONING if in_reasoning else _CONTENT
        self._return_mode = self._mode  # where a tool call goes back to
        self._tool_buf: list[str] = []
        self._held = ""  # whitespace held back at the end of the current segment
        self._seg_has_text = False  # the current segment has emitted non-whitespace text
        self._after_tag = in_reasoning  # the current segment follows a tag: its leading whitespace is dropped
        self._n_calls = 0  # well-formed calls so far
        self._n_blocks = 0  # <tool_call> blocks so far
        self._finished = False

    @staticmethod
    def prompt_in_reasoning(tokenizer: Any, prompt_ids: list[int]) -> bool:
        """True when the prompt's last `<think>` is not closed (the template opened reasoning for the model)."""
        open_id, close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
        if open_id is None:
            return False
        for tid in reversed(prompt_ids):
            if tid == open_id:
                return True
            if tid == close_id:
                return False
        return False

    @property
    def in_reasoning(self) -> bool:
        return self._mode == _REASONING or (self._mode == _TOOL and self._return_mode == _REASONING)

    # ------------------------------------------------------------------ public

    def feed(self, token_id: int | None, text: str) -> list[Event]:
        """Consume one generated token and its decoded text delta ('' while a character is incomplete).

        token_id None feeds text that has no token of its own (e.g. IncrementalDecoder.flush()).
        """
        events: list[Event] = []
        if not isinstance(text, str):
            text = ""
        tag = self._tags.get(token_id)
        if tag is None:
            self._text(text, events)
            return events
        # The delta of a tag token may carry text released from before it (an incomplete character now done).
        if text.endswith(tag):
            before = text[: -len(tag)]
        elif tag in text:
            cut = text.rfind(tag)
            before = text[:cut] + text[cut + len(tag) :]
        else:
            before = text
        self._text(before, events)
        self._tag(tag, events)
        return events

    def finish(self) -> list[Event]:
        """End of the reply: report an unterminated tool call and release held-back whitespace."""
        events: list[Event] = []
        if self._finished:
            return events
        self._finished = True
        if self._mode == _TOOL:
            self._tool_error("unterminated <tool_call> (no </tool_call> before the end)", events)
            self._mode = self._return_mode
            self._end_segment()
        if self._held and self._seg_has_text:
            self._emit(self._held, events)
        self._held = ""
        return events

    # ------------------------------------------------------------------ internals

    def _emit(self, text: str, events: list[Event]) -> None:
        cls = ReasoningDelta if self._mode == _REASONING else ContentDelta
        if events and type(events[-1]) is cls:
            events[-1] = cls(events[-1].text + text)
        else:
            events.append(cls(text))

    def _end_segment(self) -> None:
        self._held = ""
        self._seg_has_text = False
        self._after_tag = True

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._mode == _TOOL:
            self._tool_buf.append(text)
            return
        if not self._seg_has_text and self._after_tag:
            text = text.lstrip()
            if not text:
                return
        body = text.rstrip()
        trail = text[len(body) :]
        if body:
            self._emit(self._held + body, events)
            self._seg_has_text = True
            self._held = trail
        else:
            self._held += trail

    def _tag(self, tag: str, events: list[Event]) -> None:
        if self._mode == _TOOL:
            if tag == TOOL_CALL_CLOSE:
                self._close_call(events)
                self._mode = self._return_mode
                self._end_segment()
                return
            # Any other tag inside a call means the call was never closed.
            self._tool_error(f"unterminated <tool_call> (interrupted by {tag})", events)
            self._mode = self._return_mode
            self._end_segment()
        if tag == TOOL_CALL_OPEN:
            self._end_segment()
            self._return_mode = self._mode
            self._mode = _TOOL
            self._tool_buf = []
        elif tag == THINK_OPEN:
            self._end_segment()
            self._mode = _REASONING
        elif tag == THINK_CLOSE:
            self._end_segment()
            self._mode = _CONTENT
        # a stray </tool_call> outside a call is dropped

    def _tool_error(self, message: str, events: list[Event]) -> None:
        events.append(ToolCallError(index=self._n_blocks, raw="".join(self._tool_buf), message=message))
        self._n_blocks += 1
        self._tool_buf = []

    def _close_call(self, events: list[Event]) -> None:
        raw = "".join(self._tool_buf)
        try:
            name, arguments = self._parse_call(raw)
        except ValueError as e:
            self._tool_error(str(e), events)
            return
        call_id = f"call_{self._rng.getrandbits(96):024x}"
        events.append(ToolCall(index=self._n_calls, id=call_id, name=name, arguments=arguments))
        self._n_calls += 1
        self._n_blocks += 1
        self._tool_buf = []

    @staticmethod
    def _parse_call(raw: str) -> tuple[str, str]:
        """(name, arguments JSON object text) from the text of a <tool_call> block; ValueError with a reason."""
        text = raw.strip()
        if not text:
            raise ValueError("empty <tool_call>")
        try:
            obj = _loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call is not valid JSON: {e.msg} at position {e.pos}") from None
        except (ValueError, RecursionError) as e:
            raise ValueError(f"tool call is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"tool call must be a JSON object, got {type(obj).__name__}")
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError('tool call has no "name" string')
        args = obj.get("arguments", obj.get("parameters"))
        if args is None:
            args = {}
        elif isinstance(args, str):  # arguments written as a JSON string
            if not args.strip():
                args = {}
            else:
                try:
                    args = _loads(args)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f'"arguments" is a string that is not JSON: {e}') from None
        if not isinstance(args, dict):
            raise ValueError(f'"arguments" must be a JSON object, got {type(args).__name__}')
        return name.strip(), json.dumps(args, ensure_ascii=False)
