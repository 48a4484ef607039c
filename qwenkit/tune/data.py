"""Training data: OpenAI messages, ShareGPT and Alpaca JSONL, rendered with the model's own chat template, with
loss on the assistant's tokens only (by default).

Each line is one conversation:
- OpenAI:   {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ..., "tool_calls": [...]}],
             "tools": [...]}
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": ...}]}
- Alpaca:   {"instruction": ..., "input": ..., "output": ..., "system": ...}

An assistant turn's loss covers everything after its `<|im_start|>assistant\n` header up to and including its
`<|im_end|>`, so the model also learns where to stop. The spans are found in the rendering of the whole
conversation, which is what the model trains on: whatever the template puts inside a turn (tool-call tags, <think>
blocks) is learned as it really is there. Rendering the conversation up to each turn instead would not do: Qwen3's
template drops earlier turns' reasoning and gives only the turns after the last user message a <think> block, so
a partial rendering is not a prefix of the whole one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.errors import BadData

IGNORE = -100  # label of a token without loss (PyTorch's cross_entropy ignore_index)
# Every Qwen chat template is ChatML: a turn is `<|im_start|>ROLE\n ... <|im_end|>`.
ASSISTANT_HEADER, TURN_START, TURN_END = "<|im_start|>assistant\n", "<|im_start|>", "<|im_end|>"
ASSISTANT_TURN = re.compile(re.escape(ASSISTANT_HEADER) + "(.*?" + re.escape(TURN_END) + ")", re.DOTALL)
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int


@dataclass
class Skipped:
    line: int
    reason: str


def _conversation(raw: Any, where: str) -> tuple[list[dict], list[dict] | None]:
    if not isinstance(raw, dict):
        raise BadData(f"{where}: a line must be a JSON object")
    if "messages" in raw:
        messages, tools = raw["messages"], raw.get("tools")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadData(f"{where}: 'messages' must be a list of objects")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise BadData(f"{where}: messages[{i}] has unknown role {m.get('role')!r} (expected one of "
                              f"{', '.join(sorted(ROLES))})")
        if tools is not None and not isinstance(tools, list):
            raise BadData(f"{where}: 'tools' must be a list")
        return messages, tools
    if "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list):
            raise BadData(f"{where}: 'conversations' must be a list")
        messages = []
        for i, t in enumerate(turns):
            role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None:
                raise BadData(f"{where}: conversations[{i}] has unknown 'from' "
                              f"{t.get('from') if isinstance(t, dict) else t!r}")
            if not isinstance(t.get("value"), str):
                raise BadData(f"{where}: conversations[{i}] has no text 'value'")
            messages.append({"role": role, "content": t["value"]})
        return messages, None
    if "instruction" in raw and "output" in raw:
        if not isinstance(raw["instruction"], str) or not isinstance(raw["output"], str):
            raise BadData(f"{where}: 'instruction' and 'output' must be strings")
        prompt = raw["instruction"] + (f"\n\n{raw['input']}" if raw.get("input") else "")
        messages = ([{"role": "system", "content": raw["system"]}] if raw.get("system") else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": raw["output"]}]
        return messages, None
    raise BadData(f"{where}: not a known format (expected 'messages', 'conversations', or 'instruction' and "
                  "'output')")


def assistant_spans(full: str, turns: int, where: str) -> list[tuple[int, int]]:
    """Character ranges of the assistant turns in a rendered conversation: each from after its header to the end
    of its end-of-turn token. `turns`: how many assistant messages the conversation has; the rendering must hold
    exactly as many well-formed assistant turns (a message that writes a header of its own makes them ambiguous)."""
    found = [m.span(1) for m in ASSISTANT_TURN.finditer(full)]
    if len(found) != turns or any(TURN_START in full[start:end] for start, end in found):
        raise BadData(f"{where}: the chat template's rendering has {len(found)} assistant turn(s) "
                      f"({ASSISTANT_HEADER!r} ... {TURN_END!r}) for the conversation's {turns}, so which tokens to "
                      "learn is unclear; use --train-on all to learn every token")
    return found


def tokenize(model: Any, messages: list[dict], tools: list[dict] | None, line: int,
             train_on: str = "assistant", path: str | Path | None = None) -> Example:
    """Token ids and labels of one conversation. train_on: "assistant" (loss on assistant turns) or "all". path:
    the data file, for errors (which name it and the line)."""
    full = model.render(messages, tools=tools, add_generation_prompt=False)
    if train_on == "assistant":
        where = f"{path}:{line}" if path is not None else f"line {line}"
        spans = assistant_spans(full, sum(m["role"] == "assistant" for m in messages), where)
    else:
        spans = [(0, len(full))]
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans:
        for text, learn in ((full[pos:start], False), (full[start:end], True)):
            if text:
                piece = model.tokenizer.encode(text)
                ids += piece
                labels += piece if learn else [IGNORE] * len(piece)
        pos = end
    if pos < len(full):
        piece = model.tokenizer.encode(full[pos:])
        ids += piece
        labels += [IGNORE] * len(piece)
    return Example(ids, labels, line)


def load_examples(model: Any, path: str | Path, max_len: int, on_bad: str = "stop",
                  train_on: str = "assistant") -> tuple[list[Example], list[Skipped]]:
    """Every usable example of a file. on_bad: "stop" raises BadData at the first bad or too-long line; "skip"
    leaves it out and reports it in the second list."""
    if on_bad not in ("stop", "skip"):
        raise ValueError(f"on_bad must be 'stop' or 'skip', got {on_bad!r}")
    examples, skipped = [], []
    for n, item in read_conversations(path):
        try:
            if isinstance(item, BadData):
                raise item
            messages, tools = item
            ex = tokenize(model, messages, tools, n, train_on, path)
            if len(ex.input_ids) > max_len:
                raise BadData(f"{path}:{n}: the example is {len(ex.input_ids)} tokens, longer than the "
                              f"{max_len}-token limit")
            examples.append(ex)
        except BadData as e:
            if on_bad == "stop":
                raise
            skipped.append(Skipped(n, str(e)))
    if not examples:
        raise BadData(f"{path}: no usable examples" + (f" ({len(skipped)} skipped)" if skipped else " (empty file)"))
    return examples, skipped


def read_conversations(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, (messages, tools)) for each non-blank line, or (line number, BadData) for a bad one: the
    caller decides whether a bad line stops the run."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadData(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
            messages, tools = _conversation(raw, where)
            if not any(m["role"] == "assistant" for m in messages):
                raise BadData(f"{where}: no assistant message to learn from")
            yield n, (messages, tools)
        except json.JSONDecodeError as e:
            yield n, BadData(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
        except BadData as e:
            yield n, e
