"""Training data: OpenAI messages, ShareGPT and Alpaca JSONL, rendered with the model's own chat template, with
loss on the assistant's tokens only (by default).

Each line is one conversation:
- OpenAI:   {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ..., "tool_calls": [...]}],
             "tools": [...]}
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": ...}]}
- Alpaca:   {"instruction": ..., "input": ..., "output": ..., "system": ...}

An assistant turn's loss covers its text and the end-of-turn token, so the model also learns where to stop. The
spans are found by rendering the conversation up to each assistant turn with the template (with and without that
turn), so whatever the template puts around a turn (tool-call tags, <think> blocks) is treated as it really is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.errors import BadData

IGNORE = -100  # label of a token without loss (PyTorch's cross_entropy ignore_index)
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


def tokenize(model: Any, messages: list[dict], tools: list[dict] | None, line: int,
             train_on: str = "assistant") -> Example:
    """Token ids and labels of one conversation. train_on: "assistant" (loss on assistant turns) or "all"."""
    full = model.render(messages, tools=tools, add_generation_prompt=False)
    spans = []  # character ranges of the assistant turns in `full`
    if train_on == "assistant":
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = model.render(messages[:i], tools=tools, add_generation_prompt=True)
            upto = model.render(messages[: i + 1], tools=tools, add_generation_prompt=False)
            if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
                raise BadData(f"line {line}: the chat template renders assistant turn {i} differently on its own "
                              "(use train_on='all' for this template)")
            end = upto.rstrip("\n")  # the turn's text and its end token; the newline after it is the template's
            spans.append((len(before), len(end)))
    else:
        spans.append((0, len(full)))
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
            ex = tokenize(model, messages, tools, n, train_on)
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
