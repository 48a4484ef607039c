"""ChatTemplate.render against transformers' apply_chat_template(..., tokenize=False) with the same template text.

Templates: Qwen2.5's from the real GGUF (needs the file) and Qwen3's official hybrid-thinking template stored in
tests/fixtures/qwen3_chat_template.jinja. transformers renders with a tiny tokenizer carrying the same bos/eos
tokens as ours; only the template and the special-token names matter for rendering.
"""

import copy
import json
from pathlib import Path

import pytest

from qwenkit.text.chat import ChatTemplate
from tests.peers.gguf_meta import read_gguf_meta
from tests.unit.test_stream_parser import tiny_tokenizer

pytestmark = pytest.mark.peer

QWEN3 = (Path(__file__).parent.parent / "fixtures" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
BOS, EOS = "<|endoftext|>", "<|im_end|>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city. 天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
NOW = {
    "type": "function",
    "function": {"name": "now", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
}

SYSTEM = {"role": "system", "content": "You are a terse assistant. Réponds en français si on te parle français."}
USER1 = {"role": "user", "content": "What's the weather in Paris and Oslo? 🌦"}
CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}},
        },
    ],
}
TOOL_RESULTS = [
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21, "sky": "sunny"}'},
    {"role": "tool", "tool_call_id": "call_b", "content": '{"temp": -3, "sky": "snow"}'},
]
ANSWER = {"role": "assistant", "content": "Paris: 21°C, sunny. Oslo: -3°C, snow."}
CHAT = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "写一首关于秋天的短诗。"},
]


def as_json_string_args(messages):
    """The same conversation with tool-call arguments sent as JSON strings (as OpenAI clients do)."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    return out


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def qwen25(default_gguf):
    return read_gguf_meta(default_gguf)["tokenizer.chat_template"]


def check(
    hf_tok, template, messages, *, ours_messages=None, tools=None, add_generation_prompt=True, enable_thinking=None
):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = hf_tok.apply_chat_template(
        copy.deepcopy(messages),
        tools=tools,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    got = ChatTemplate(template, bos_token=BOS, eos_token=EOS).render(
        ours_messages if ours_messages is not None else messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    assert got == expected
    return got


QWEN25_CASES = {
    "system": dict(messages=[SYSTEM, USER1]),
    "default_system": dict(messages=[USER1]),
    "several_turns": dict(messages=CHAT),
    "several_turns_no_prompt": dict(
        messages=CHAT + [{"role": "assistant", "content": "秋风起，叶飘零。"}], add_generation_prompt=False
    ),
    "tools_with_system": dict(messages=[SYSTEM, USER1], tools=[WEATHER, NOW]),
    "tools_default_system": dict(messages=[USER1], tools=[WEATHER, NOW]),
    "tool_calls_and_results": dict(messages=[SYSTEM, USER1, CALLS, *TOOL_RESULTS], tools=[WEATHER]),
    "tool_round_trip_no_prompt": dict(
        messages=[USER1, CALLS, *TOOL_RESULTS, ANSWER], tools=[WEATHER], add_generation_prompt=False
    ),
}


@pytest.mark.real_weights
@pytest.mark.parametrize("case", sorted(QWEN25_CASES))
def test_qwen25_template(hf_tok, qwen25, case):
    check(hf_tok, qwen25, **QWEN25_CASES[case])


@pytest.mark.real_weights
def test_qwen25_arguments_as_json_string(hf_tok, qwen25):
    # Qwen2.5 renders `arguments | tojson`: a JSON string would come out quoted; we normalise it to the object the
    # model was trained on, i.e. what transformers renders when given a dict.
    messages = [USER1, CALLS, *TOOL_RESULTS]
    got = check(hf_tok, qwen25, messages, ours_messages=as_json_string_args(messages), tools=[WEATHER])
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' in got


@pytest.mark.real_weights
def test_qwen25_content_parts(hf_tok, qwen25):
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]}]
    check(hf_tok, qwen25, [{"role": "user", "content": "line one\nline two"}], ours_messages=parts)


REASONED = {
    "role": "assistant",
    "content": "Hello! How can I help?",
    "reasoning_content": "The user greets me; greet back.",
}
QWEN3_CASES = {
    "thinking_default": dict(messages=[SYSTEM, USER1]),
    "thinking_on": dict(messages=[USER1], enable_thinking=True),
    "thinking_off": dict(messages=[USER1], enable_thinking=False),
    "earlier_reasoning_dropped": dict(messages=[CHAT[0], REASONED, CHAT[2]]),
    "earlier_reasoning_in_content_dropped": dict(
        messages=[CHAT[0], {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"}, CHAT[2]],
        enable_thinking=False,
    ),
    "last_turn_keeps_reasoning": dict(messages=[CHAT[0], REASONED], add_generation_prompt=False),
    "tools_and_calls": dict(messages=[SYSTEM, USER1, {**CALLS, "content": ""}, *TOOL_RESULTS], tools=[WEATHER, NOW]),
    "tool_round_trip_reasoning": dict(
        messages=[
            USER1,
            {**CALLS, "content": "Checking.", "reasoning_content": "Need both cities."},
            *TOOL_RESULTS,
            {**ANSWER, "reasoning_content": "Summarise."},
        ],
        tools=[WEATHER],
        add_generation_prompt=False,
    ),
}


@pytest.mark.parametrize("case", sorted(QWEN3_CASES))
def test_qwen3_template(hf_tok, case):
    check(hf_tok, QWEN3, **QWEN3_CASES[case])


def test_qwen3_tool_calls_with_null_content(hf_tok):
    # OpenAI clients send content null beside tool calls. transformers drops the key and the first Qwen3 template
    # then fails on `'</think>' in message.content`; we send "" instead, which renders like no content.
    ours = [USER1, CALLS, *TOOL_RESULTS]
    theirs = [USER1, {**CALLS, "content": ""}, *TOOL_RESULTS]
    got = check(hf_tok, QWEN3, theirs, ours_messages=as_json_string_args(ours), tools=[WEATHER])
    assert "<|im_start|>assistant\n<tool_call>\n" in got


def test_qwen3_thinking_switch_and_dropped_reasoning(hf_tok):
    on = check(hf_tok, QWEN3, [USER1], enable_thinking=True)
    off = check(hf_tok, QWEN3, [USER1], enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    dropped = check(hf_tok, QWEN3, [CHAT[0], REASONED, CHAT[2]])
    assert "greet back" not in dropped and "Hello! How can I help?" in dropped


def test_qwen3_reasoning_alias(hf_tok):
    # `thinking` / `reasoning` are read as reasoning_content, as transformers does.
    msgs = [CHAT[0], {"role": "assistant", "content": "Hi!", "reasoning": "Be nice."}]
    got = check(hf_tok, QWEN3, msgs, add_generation_prompt=False)
    assert "<think>\nBe nice.\n</think>\n\nHi!" in got
