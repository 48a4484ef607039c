"""The first step of a turn: which tools does the request need? Asked as a choice among the tools' names.

Offered every tool at once and left to write its calls freely, a small on-device model calls what it sees rather than
what was asked: Qwen2.5-Coder-0.5B followed 8 of 8 directions questions with a `get_weather` call, answered web-search
requests with `search_places`, and wrote calls to tools that do not exist. Asked instead "which of these tools does
this request need?", with the answer constrained to JSON naming declared tools only (response_format json_schema) and
a few worked examples, it chose exactly the needed tools for 45 of the 48 build requests (benchmarks/agent.py). Each
chosen tool is then called with decoding constrained to that tool's schema (a named tool_choice), and a request that
needs no tool is answered without any.

    messages = plan_messages(tools, question, earlier)
    reply = chat(messages, response_format=plan_format(tools))
    read_plan(reply_text, tools)   # ["get_directions", "get_weather"], [] for none, None if unreadable
"""

from __future__ import annotations

import json
from typing import Any

from qwenkit.apps.assistant.tool import Tool

MAX_PLANNED = 3  # calls a plan may ask for: more is a small model listing tools, not a request that needs them

PLAN_SYSTEM = (
    "You decide which tools a user's request needs, before any tool is used. The tools:\n{tools}\n\n"
    "Reply with JSON only: {{\"tools\": [...]}}, the names of the tools the request asks for, in the order to use "
    "them. Go by what the user asks for, not by the places or names the request mentions. A request for one thing "
    "needs one tool. Reply {{\"tools\": [\"{none}\"]}} when no tool is needed: greetings, thanks, arithmetic, "
    "translation, explanations, poems and stories."
)
# "No tool" is offered as one more name, listed last, rather than as an empty list: choosing `]` at once is a choice
# the 0.5B model rarely makes, and requests that need no tool (a translation, a sum, "你会说英语吗？") got
# get_directions, the first tool listed. As a name with its own "use when", the build set's 12 such requests went
# from 8 to 11 right.
NO_TOOL = ("no tool; you answer yourself. Use when the user greets, thanks or chats, or asks for a translation, a "
           "joke, a story, a poem, a sum or general knowledge.")

# Worked examples: (request, tools). Written for this prompt alone: no request of the benchmark sets
# (benchmarks/agent.py, benchmarks/data/agent_heldout.jsonl) shares their wording. An example is shown only when
# every tool it names is one the agent has, so MCP-only agents see just the examples that need no tool.
EXAMPLES: list[tuple[str, list[str]]] = [
    ("Which way should I drive from Lisbon to Porto?", ["get_directions"]),
    ("南京明天冷不冷？", ["get_weather"]),
    ("Where exactly is Kyoto Station?", ["search_places"]),
    ("Who is the mayor of Tokyo now? Look it up.", ["web_search"]),
    ("告诉小陈我今晚不回来吃饭。", ["draft_message"]),
    ("What is 9 plus 10?", []),
    ("苏州附近有什么好玩的景点？帮我上网搜搜。", ["web_search"]),
    ("Walk me from Kyoto Station to Gion, and is it raining in Kyoto?", ["get_directions", "get_weather"]),
    ("写一首关于月亮的短诗。", []),
    ("Let Ben know I'll bring the cake.", ["draft_message"]),
    ("从南京南站到夫子庙怎么走？", ["get_directions"]),
    ("Hi! How are you today?", []),
]


def plan_messages(tools: list[Tool], question: Any, earlier: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The chat that asks for the plan: the tools and examples, the conversation so far as plain text, then the
    request (a string, or content parts when it carries pictures)."""
    names = {t.name for t in tools}
    none = _none_name(tools)
    # "Use when" hints took the 0.5B coder model's choice from 36 to 40 of the 42 build requests: without them it
    # goes by the places a request names ("帮我搜索一下西湖的门票价格" chose get_weather).
    listing = "\n".join(f"- {t.name}: {t.description}" + (f" Use when {t.use_when}." if t.use_when else "")
                        for t in tools) + f"\n- {none}: {NO_TOOL}"
    messages: list[dict[str, Any]] = [{"role": "system", "content": PLAN_SYSTEM.format(tools=listing, none=none)}]
    for request, chosen in EXAMPLES:
        if set(chosen) <= names:
            messages += [{"role": "user", "content": request},
                         {"role": "assistant", "content": json.dumps({"tools": chosen or [none]})}]
    return [*messages, *earlier, {"role": "user", "content": question}]


def plan_format(tools: list[Tool]) -> dict[str, Any]:
    """The response_format that keeps the plan to declared tool names (and the name that stands for none)."""
    names = [t.name for t in tools] + [_none_name(tools)]
    schema = {"type": "object", "additionalProperties": False, "required": ["tools"],
              "properties": {"tools": {"type": "array", "minItems": 1, "maxItems": MAX_PLANNED,
                                       "items": {"type": "string", "enum": names}}}}
    return {"type": "json_schema", "json_schema": {"name": "tool_plan", "strict": True, "schema": schema}}


def read_plan(text: str, tools: list[Tool]) -> list[str] | None:
    """The tools a plan names, in order, or None when the reply is no plan (a backend that ignored
    response_format): the agent then lets the model call tools freely. A tool named twice is called twice (the
    weather in two cities); the second call sees the first, and a repeat of it is not run again."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    chosen = value.get("tools") if isinstance(value, dict) else None
    none = _none_name(tools)
    names = {t.name for t in tools} | {none}
    if not isinstance(chosen, list) or not all(isinstance(n, str) and n in names for n in chosen):
        return None
    return [n for n in chosen if n != none][:MAX_PLANNED]


def _none_name(tools: list[Tool]) -> str:
    """The name that stands for "no tool": "none", unless a tool is called that."""
    names = {t.name for t in tools}
    return next(n for n in ("none", "no_tool", "no_tool_needed") if n not in names)
