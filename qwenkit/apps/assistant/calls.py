"""Tool calls written as plain JSON text: what small models do instead of Qwen's <tool_call> tags.

Qwen2.5-Coder-0.5B, asked with tools, answers `{"name": "get_weather", "arguments": {"location": "Hangzhou"}}`
(sometimes in a ```json fence, sometimes one call per line, sometimes one closing brace short) as its content. A
reply that *starts* with such an object is taken as calls to the declared tools; prose that merely quotes an example
is left alone. Objects that are not calls (a model imagining the tool's answer) are dropped; an object with a name and
an arguments object is a call even when the name is no tool's, so the model hears which tools there are.
"""

from __future__ import annotations

import json
from typing import Any

_DECODER = json.JSONDecoder()
_MAX_REPAIR = 3  # closing braces a truncated last object may be missing


def looks_like_call(text: str) -> bool:
    """Whether a reply so far could still turn out to be a JSON tool call (decides what streaming holds back)."""
    t = text.lstrip()
    return t == "" or t.startswith(("{", "[", "`"))


def salvage_calls(content: str, tool_names: set[str]) -> list[dict[str, Any]]:
    """The calls (dicts with name and arguments) a reply writes as leading JSON, or [] when it is not one."""
    text = _unfence(content.strip())
    if not text.startswith(("{", "[")):
        return []
    calls: list[dict[str, Any]] = []
    pos = 0
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] not in "{[":
            break
        value, pos = _decode(text, pos)
        if value is None:
            break
        for item in value if isinstance(value, list) else [value]:
            call = _as_call(item, tool_names)
            if call is not None:
                calls.append(call)
            elif not calls:
                return []  # the reply opens with JSON that is no call: an answer in JSON, not a call
    return calls


def _unfence(text: str) -> str:
    if text.startswith("```"):
        body = text[3:]
        newline = body.find("\n")
        body = body[newline + 1:] if newline >= 0 else ""
        end = body.rfind("```")
        return (body[:end] if end >= 0 else body).strip()
    return text


def _decode(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        pass
    # A truncated object missing its last braces: on its own line (one call per line) or at the end of the text.
    line = text[pos:].split("\n", 1)[0].rstrip()
    block = text[pos:].split("\n\n", 1)[0].rstrip()
    for candidate in dict.fromkeys((line, block)):
        for missing in range(1, _MAX_REPAIR + 1):
            try:
                value, _ = _DECODER.raw_decode(candidate + "}" * missing)
            except json.JSONDecodeError:
                continue
            return value, pos + len(candidate)
    return None, pos


def _as_call(item: Any, tool_names: set[str]) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
        item = item["function"]
    name = item.get("name")
    # A call to a tool that does not exist ({"name": "send_text", "arguments": {...}}) is still a call: the agent
    # answers it with the list of real tools, and the model gets to pick one.
    if not isinstance(name, str) or (name not in tool_names and not isinstance(item.get("arguments"), dict)):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {"name": name, "arguments": arguments}  # left for the schema check to refuse with a message
    return {"name": name, "arguments": arguments}


def call_key(name: str, arguments: Any) -> str:
    """The identity of a call, for spotting a model that repeats itself."""
    return name + ":" + json.dumps(arguments, sort_keys=True, ensure_ascii=False)
