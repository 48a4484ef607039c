"""Render a conversation with the model's own Jinja chat template, exactly as transformers' apply_chat_template does.

The Jinja environment copies transformers (utils/chat_template_utils.py): ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension and a `{% generation %}` block, a `tojson` filter that
does not escape HTML or non-ASCII and takes indent/separators/sort_keys, `raise_exception`, `strftime_now`, and
hardened `dict`/`namespace` globals. Each template source is compiled once (cached).

Messages are validated first (OpenAI shape) and normalised the way transformers does before rendering: None-valued
keys are dropped, text parts are joined, reasoning given as `reasoning_content`/`thinking`/`reasoning` is exposed
under the first two names, and tool-call arguments sent as a JSON string are turned into the object Qwen
templates expect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenkit.errors import BadRequest, QwenkitError, TemplateError

__all__ = ["ChatTemplate", "CHATML_TEMPLATE"]

ROLES = ("system", "user", "assistant", "tool")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# Used when a model ships no template: plain ChatML, tools and tool calls the Qwen2.5 way, no default system prompt.
CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if content %}
            {{- '\\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- (call.arguments if call.arguments is string else call.arguments | tojson) + '}\\n</tool_call>' }}
        {%- endfor %}
        {%- if not content and not message.tool_calls %}
            {{- '\\n' }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


class _RaisedByTemplate(jinja2.exceptions.TemplateError):
    """raise_exception(...) called by the template: its message is the user-facing one."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in some templates): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict` as templates see it: builds dicts, exposes nothing else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` that refuses underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: Any) -> None:
    raise _RaisedByTemplate(str(message))


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value: Any, where: str) -> Any:
    """A copy built only of JSON types (the sandbox must not see arbitrary objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BadRequest(f"{where}: object keys must be strings, got {k!r}")
            out[str.__str__(k)] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise BadRequest(f"{where}: {type(value).__name__} is not a JSON value")


IMAGE_PART_TYPES = ("image_url", "image")


def _image_source(part: Mapping, where: str) -> str:
    """The URL (or path) of an image content part: OpenAI's {"type": "image_url", "image_url": {"url": ...}}
    (or "image_url": "..."), or transformers' {"type": "image", "image": ...} / {"type": "image", "url": ...}."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, Mapping) else ref
    else:
        url = part.get("image", part.get("url", part.get("path")))
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: an image part needs a URL (image_url.url) as a string")
    return url


def _text_content(content: Any, where: str, vision: bool = False) -> str | list[dict[str, Any]] | None:
    """content as a string: str, None, or a list of {"type": "text", "text": ...} parts joined by newlines.
    With `vision` (a model that takes images), a list with image parts stays a list of text parts and
    {"type": "image"} placeholders, which is what the vision models' templates iterate over."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise BadRequest(f"{where}[{j}]: a content part must be an object")
            kind = part.get("type")
            if kind in IMAGE_PART_TYPES:
                if not vision:
                    raise BadRequest(f"{where}[{j}].type: {kind!r} parts need a vision-language model; this one "
                                     "takes text only")
                _image_source(part, f"{where}[{j}]")
                parts.append({"type": "image"})
                continue
            if kind != "text":
                raise BadRequest(f"{where}[{j}].type: only 'text' and 'image_url' parts are supported, got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{j}].text: must be a string")
            parts.append({"type": "text", "text": part["text"]})
        if any(p["type"] == "image" for p in parts):
            return parts
        return "\n".join(p["text"] for p in parts)  # as vLLM joins text parts
    raise BadRequest(f"{where}: must be a string, null or a list of text parts, got {type(content).__name__}")


def image_sources(messages: list[Any]) -> list[str]:
    """The URLs (or paths) of the images in a conversation, in the order the template renders them."""
    out = []
    for i, msg in enumerate(messages if isinstance(messages, list) else []):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
                out.append(_image_source(part, f"messages[{i}].content[{j}]"))
    return out


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise BadRequest(f"{where}: a tool call must be an object")
    if call.get("type", "function") != "function":
        raise BadRequest(f"{where}.type: must be 'function', got {call.get('type')!r}")
    if "id" in call and call["id"] is not None and not isinstance(call["id"], str):
        raise BadRequest(f"{where}.id: must be a string")
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        raise BadRequest(f"{where}.function: missing or not an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.function.name: missing or not a non-empty string")
    args = fn.get("arguments")
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRequest(f"{where}.function.arguments: not valid JSON ({e.msg} at {e.pos})") from e
        if not isinstance(parsed, dict):
            raise BadRequest(f"{where}.function.arguments: must be a JSON object, got {type(parsed).__name__}")
        args = parsed
    elif not isinstance(args, Mapping):
        raise BadRequest(f"{where}.function.arguments: must be an object or a JSON string")
    out = _plain({k: v for k, v in call.items() if v is not None}, where)
    out["function"] = {**_plain({k: v for k, v in fn.items() if v is not None}, f"{where}.function"),
                       "arguments": _plain(args, f"{where}.function.arguments")}
    return out


def _message(msg: Any, i: int, vision: bool = False) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(msg, Mapping):
        raise BadRequest(f"{where}: a message must be an object, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
    content = _text_content(msg.get("content"), f"{where}.content", vision)
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None and role != "assistant":
        raise BadRequest(f"{where}.tool_calls: only assistant messages carry tool calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise BadRequest(f"{where}.tool_calls: must be a list")
    calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(tool_calls or [])]
    if content is None and role != "assistant":
        raise BadRequest(f"{where}.content: required for a {role} message")

    out = {k: _plain(v, f"{where}.{k}") for k, v in msg.items() if v is not None and k not in ("content", "tool_calls")}
    if content is not None:
        out["content"] = content
    if calls:
        out["tool_calls"] = calls
    if role == "assistant" and content is None:
        # OpenAI sends content null beside tool calls; Qwen templates test or concatenate content (the first Qwen3
        # template does `'</think>' in message.content`), and "" renders like a missing one everywhere else.
        out["content"] = ""
    field = next((k for k in _REASONING_FIELDS if msg.get(k) is not None), None)
    if field is not None:
        reasoning = msg[field]
        if role != "assistant" or not isinstance(reasoning, str):
            raise BadRequest(f"{where}.{field}: must be a string on an assistant message")
        # As transformers: templates read `reasoning_content` (Qwen) or `thinking` (gpt-oss).
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    if "tool_call_id" in out and not isinstance(out["tool_call_id"], str):
        raise BadRequest(f"{where}.tool_call_id: must be a string")
    if "name" in out and not isinstance(out["name"], str):
        raise BadRequest(f"{where}.name: must be a string")
    return out


def _cut_after(text: str, part: str) -> int | None:
    """Where `part` (as the template rendered it, perhaps stripped) ends in `text`, searching from the end."""
    stripped = part.strip()
    at = text.rfind(stripped) if stripped else -1
    if at < 0:
        return None
    keep = part.lstrip()
    # As transformers: keep the part's own trailing spaces where the template kept them.
    return at + len(keep) if text[at:at + len(keep)] == keep else at + len(stripped)


def _cut_after_final(text: str, final: dict[str, Any]) -> str:
    """The rendered conversation up to the end of the final message as written so far (its end-of-turn cut off).

    What the message ends with decides where: its last tool call, else its content, else its reasoning (a
    reasoning block left open, so the model goes on thinking), else nothing (the turn opens after its header)."""
    if final.get("tool_calls"):
        at = text.rfind("</tool_call>")
        end = at + len("</tool_call>") if at >= 0 else None
    elif isinstance(final.get("content"), str) and final["content"].strip():
        end = _cut_after(text, final["content"])
    elif final.get("reasoning_content", "").strip():
        end = _cut_after(text, final["reasoning_content"])
    else:
        at = text.rfind("<|im_end|>")
        end = at if at >= 0 else len(text)
    if end is None:
        raise TemplateError("continue_final_message: the chat template does not render the final message verbatim")
    return text[:end]


class ChatTemplate:
    """A model's chat template (or the built-in ChatML one when `source` is None), ready to render conversations."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None) -> None:
        if source is not None and not isinstance(source, str):
            raise TemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.is_builtin = source is None
        self.source: str = CHATML_TEMPLATE if source is None else source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _compile(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from e
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from e

    @property
    def supports_thinking_switch(self) -> bool:
        """True when the template reads `enable_thinking` (Qwen3 hybrid models)."""
        return "enable_thinking" in self.source

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        continue_final_message: bool = False,
        vision: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts). enable_thinking=None leaves it undefined.

        continue_final_message: the last message (an assistant's) is left open, so that generation carries on
        from its last character (a prefill, or an answer cut off mid-stream). As transformers and vLLM do.
        vision: the model takes images; image parts are rendered by the template (else they are refused).
        """
        if not isinstance(messages, list):
            raise BadRequest(f"messages: must be a list, got {type(messages).__name__}")
        if not messages:
            raise BadRequest("messages: the conversation is empty")
        chat = [_message(m, i, vision) for i, m in enumerate(messages)]
        if tools is not None:
            if not isinstance(tools, list):
                raise BadRequest(f"tools: must be a list, got {type(tools).__name__}")
            for i, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    raise BadRequest(f"tools[{i}]: must be an object")
            tools = _plain(tools, "tools")
        if enable_thinking is not None and not isinstance(enable_thinking, bool):
            raise BadRequest("enable_thinking: must be true, false or null")

        kwargs: dict[str, Any] = {}
        if self.bos_token is not None:
            kwargs["bos_token"] = self.bos_token
        if self.eos_token is not None:
            kwargs["eos_token"] = self.eos_token
        kwargs.update(_plain(template_kwargs, "template_kwargs"))
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        documents = kwargs.pop("documents", None)  # transformers passes documents=None when not given
        if continue_final_message:
            if add_generation_prompt:
                raise BadRequest("continue_final_message: cannot be combined with add_generation_prompt")
            if chat[-1]["role"] != "assistant":
                raise BadRequest("continue_final_message: the last message must be an assistant's")
        try:
            text = self._template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=bool(add_generation_prompt),
                **kwargs,
            )
        except _RaisedByTemplate as e:
            raise TemplateError(str(e.message)) from e
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from e
        except QwenkitError:
            raise
        except Exception as e:  # a template doing arithmetic on the wrong types, etc.
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        return _cut_after_final(text, chat[-1]) if continue_final_message else text
