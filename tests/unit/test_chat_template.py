"""ChatTemplate: the built-in ChatML template, message validation, and the transformers-compatible Jinja env.

Parity with transformers' apply_chat_template on the real Qwen templates is in tests/peers/test_chat_parity.py.
"""

import json
from pathlib import Path

import pytest

from qwenkit.errors import BadRequest, TemplateError
from qwenkit.text.chat import ChatTemplate, _compile

QWEN3 = (Path(__file__).parent.parent / "fixtures" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_builtin_chatml():
    t = ChatTemplate(None)
    assert t.is_builtin
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert t.render(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.render(msgs[1:], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_builtin_chatml_tools_and_calls():
    msgs = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "2", "content": "snow"},
    ]
    out = ChatTemplate(None).render(msgs, tools=[WEATHER])
    assert out.startswith("<|im_start|>system\n# Tools\n\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in out
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nsnow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    ) in out


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    out = ChatTemplate(None).render([{"role": "user", "content": parts}])
    assert "<|im_start|>user\none\ntwo<|im_end|>" in out


def test_enable_thinking_undefined_by_default():
    t = ChatTemplate(QWEN3)
    msgs = [{"role": "user", "content": "Hi"}]
    assert t.render(msgs).endswith("<|im_start|>assistant\n")
    assert t.render(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")
    assert t.render(msgs, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    probe = ChatTemplate("{{ 'undefined' if enable_thinking is not defined else enable_thinking }}")
    assert probe.render(msgs) == "undefined"
    assert probe.render(msgs, enable_thinking=False) == "False"
    assert t.supports_thinking_switch and not ChatTemplate(None).supports_thinking_switch


def test_reasoning_aliases():
    probe = ChatTemplate("{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }};{% endfor %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "because"}]
    assert probe.render(msgs) == "|;because|because;"


def test_arguments_json_string_normalised_to_object():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": "é"}'}}]},
    ]
    out = ChatTemplate(QWEN3).render(msgs, add_generation_prompt=False)
    assert '<tool_call>\n{"name": "f", "arguments": {"x": "é"}}\n</tool_call>' in out


def test_jinja_environment_like_transformers():
    t = ChatTemplate(
        "{{ messages[0].content | tojson }}|{{ {'a': [1, 2]} | tojson(indent=2) }}|"
        "{{ {'b': 1, 'a': 2} | tojson(separators=(',', ':'), sort_keys=true) }}|{{ strftime_now('%Y') | length }}|"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
        "{% generation %}gen{% endgeneration %}|{% set ns = namespace(x=1) %}{% set ns.x = 2 %}{{ ns.x }}|"
        "{{ dict(a=1) | tojson }}|{{ bos_token }}{{ eos_token }}|{{ custom }}"
    )
    out = t.render([{"role": "user", "content": "<b>café</b> & \"q\""}], custom="kw")
    assert out == (
        '"<b>café</b> & \\"q\\""|{\n  "a": [\n    1,\n    2\n  ]\n}|{"a":2,"b":1}|4|01|gen|2|{"a": 1}||kw'
    )
    t2 = ChatTemplate("{{ bos_token }}{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert t2.render([{"role": "user", "content": "x"}]) == "<s></s>"


def test_compiled_once():
    before = _compile.cache_info().misses
    a, b = ChatTemplate("{{ 'once' }}-x"), ChatTemplate("{{ 'once' }}-x")
    assert a._template is b._template and _compile.cache_info().misses == before + 1


def test_raise_exception_becomes_template_error():
    t = ChatTemplate("{{ raise_exception('System role not supported') }}")
    with pytest.raises(TemplateError) as e:
        t.render([{"role": "user", "content": "x"}])
    assert str(e.value) == "System role not supported"
    assert isinstance(e.value, BadRequest)


def test_template_failures():
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% if %}")
    with pytest.raises(TemplateError):  # sandbox
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render(
            [{"role": "user", "content": "x"}]
        )
    with pytest.raises(TemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ 1 + messages[0].content }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages, where",
    [
        ("hello", "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "messages[1].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
        ([{"role": "assistant", "tool_calls": {"a": 1}}], "messages[0].tool_calls"),
        ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0].function"),
        (
            [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}],
            "messages[0].tool_calls[0].function.name",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"type": "retrieval", "function": {"name": "f"}}]}],
            "messages[0].tool_calls[0].type",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
        ([{"role": "user", "content": "x", "extra": object()}], "messages[0].extra"),
        ([{"role": "user", "content": "x", "reasoning_content": "r"}], "messages[0].reasoning_content"),
    ],
)
def test_invalid_messages(messages, where):
    with pytest.raises(BadRequest) as e:
        ChatTemplate(None).render(messages)
    assert str(e.value).startswith(where + ":") or str(e.value).startswith(where + " ")
    assert not isinstance(e.value, TemplateError)


def test_invalid_tools():
    with pytest.raises(BadRequest, match=r"tools\[1\]"):
        ChatTemplate(None).render([{"role": "user", "content": "x"}], tools=[WEATHER, "nope"])
    with pytest.raises(BadRequest, match="tools"):
        ChatTemplate(None).render([{"role": "user", "content": "x"}], tools=WEATHER)


def test_tools_passed_unchanged():
    probe = ChatTemplate("{{ tools | tojson }}")
    assert json.loads(probe.render([{"role": "user", "content": "x"}], tools=[WEATHER])) == [WEATHER]
    assert ChatTemplate("{{ tools is none }}").render([{"role": "user", "content": "x"}]) == "True"


def test_caller_messages_not_modified():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
    ]
    snapshot = json.dumps(msgs)
    ChatTemplate(QWEN3).render(msgs)
    assert json.dumps(msgs) == snapshot
