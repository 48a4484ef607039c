"""Constrained decoding (engine/grammar.py): masks checked token by token, then greedy generation on the real model.

The mask checks run on the real Qwen2.5 tokenizer (151,936 ids in the GGUF, the last 271 of them `[PAD<id>]` fillers)
and, for thinking, on the tiny byte-level tokenizer of test_stream_parser, which has `<think>` / `</think>`.
The generation tests load the real default model once (module fixture) and decode greedily, at most 80 tokens.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from qwenkit.engine.grammar import GrammarCompiler
from qwenkit.errors import BadRequest
from tests.unit.test_stream_parser import tiny_tokenizer

NEG = float("-inf")
IM_END, ENDOFTEXT = 151645, 151643
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "age": {"type": "integer"},
    },
    "required": ["name", "color", "age"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(default_gguf):
    from qwenkit.checkpoint import open_checkpoint

    return open_checkpoint(default_gguf)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return checkpoint.tokenizer()


@pytest.fixture(scope="module")
def compiler(checkpoint, tok) -> GrammarCompiler:
    return GrammarCompiler(tok, checkpoint.config.vocab_size, set(checkpoint.stop_token_ids(tok)))


@pytest.fixture(scope="module")
def model(default_gguf):
    import qwenkit

    return qwenkit.load(str(default_gguf), pull=False)


def allowed_after(constraint, tok, prefix: str | list[int], vocab: int) -> torch.Tensor:
    """Feed `prefix` (checking every token was allowed) and return the finite-logit mask for the next token."""
    ids = tok.encode(prefix) if isinstance(prefix, str) else prefix
    for t in ids:
        x = torch.zeros(vocab)
        constraint.mask(x)
        assert x[t] == 0, f"token {t} {tok.decode([t])!r} was masked"
        constraint.accept(t)
    x = torch.zeros(vocab)
    constraint.mask(x)
    return torch.isfinite(x)


def accepts(grammar, tok, text: str, vocab: int) -> bool:
    """Whether the grammar allows `text` token by token and then a stop token."""
    c = grammar.constraint()
    for t in tok.encode(text):
        x = torch.zeros(vocab)
        c.mask(x)
        if x[t] != 0:
            return False
        c.accept(t)
    x = torch.zeros(vocab)
    c.mask(x)
    return c.finished and bool(torch.isfinite(x[sorted(tok.stop_ids)]).all())


# ------------------------------------------------------------------------------------------------ mask unit checks


def test_mask_forbids_tokens_outside_the_grammar(compiler, tok):
    vocab = compiler.vocab_size
    ok = allowed_after(compiler.json({"type": "object"}).constraint(), tok, '{"a":', vocab)
    for text in ("abc", "hello", "x", "}"):
        assert not ok[tok.encode(text)[0]], text
    for text in ("1", " ", ' "', "true", "[", "{"):
        assert ok[tok.encode(text)[0]], text
    assert not ok[IM_END] and not ok[ENDOFTEXT]  # not complete yet


def test_stop_ids_allowed_only_when_complete(compiler, tok):
    vocab = compiler.vocab_size
    c = compiler.json(PERSON).constraint()
    ok = allowed_after(c, tok, '{"name": "Bo", "color": "red", "age": 4', vocab)
    assert not c.finished and not ok[IM_END] and not ok[ENDOFTEXT]
    assert ok[tok.encode("}")[0]] and ok[tok.encode("2")[0]]
    c = compiler.json(PERSON).constraint()
    ok = allowed_after(c, tok, '{"name": "Bo", "color": "red", "age": 4}', vocab)
    assert c.finished
    assert ok[IM_END] and ok[ENDOFTEXT]
    assert int(ok.sum()) == 2  # nothing may follow a complete value but a stop
    c.accept(IM_END)
    assert c.finished and c.error is None


def test_enum_integer_and_required_are_enforced(compiler, tok):
    vocab = compiler.vocab_size
    g = compiler.json(PERSON)
    assert accepts(g, tok, '{"name": "Bo", "color": "blue", "age": 7}', vocab)
    assert accepts(g, tok, '{\n  "name": "Bo",\n  "color": "green",\n  "age": -12\n}', vocab)
    assert not accepts(g, tok, '{"name": "Bo", "color": "pink", "age": 7}', vocab)  # not in the enum
    assert not accepts(g, tok, '{"name": "Bo", "color": "red", "age": 7.5}', vocab)  # not an integer
    assert not accepts(g, tok, '{"name": "Bo", "color": "red"}', vocab)  # age is required
    assert not accepts(g, tok, ' {"name": "Bo", "color": "red", "age": 1}', vocab)  # nothing before the value


def test_ids_past_the_vocabulary_and_gguf_pad_tokens_are_always_masked(compiler, tok):
    # Inside a JSON string nearly every token is allowed: still not the GGUF [PAD<id>] fillers.
    c = compiler.json({"type": "object"}).constraint()
    ok = allowed_after(c, tok, '{"a": "', compiler.vocab_size)
    assert ok.sum() > 100_000
    assert tok.id_to_token(151700) == "[PAD151700]" and not ok[151665:].any()
    # A model whose logits are wider than the tokenizer: the extra ids are -inf whatever the grammar says.
    wide = torch.zeros(tok.vocab_size + 64)
    compiler.json({"type": "object"}).constraint().mask(wide)
    assert torch.isneginf(wide[tok.vocab_size :]).all()


def test_a_rejected_token_leaves_only_the_stop_ids(compiler, tok):
    c = compiler.json({"type": "object"}).constraint()
    c.accept(tok.encode("x")[0])  # only a masked token can do this (all logits -inf)
    assert c.error and not c.finished
    x = torch.zeros(compiler.vocab_size)
    c.mask(x)
    assert torch.isfinite(x).nonzero().flatten().tolist() == sorted({IM_END, ENDOFTEXT})


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "frobnicate"}, "frobnicate"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "object", "required": "name"}, "required"),
        ("not a schema", "must be an object"),
    ],
)
def test_invalid_schema_is_a_bad_request(compiler, schema, words):
    with pytest.raises(BadRequest, match="schema") as e:
        compiler.json(schema)
    assert words in str(e.value)


def test_grammars_are_cached_and_constraints_independent(compiler, tok):
    g = compiler.json(PERSON)
    assert compiler.json(PERSON) is g
    a, b = g.constraint(), g.constraint()
    allowed_after(a, tok, '{"name": "A', compiler.vocab_size)
    ok = allowed_after(b, tok, "", compiler.vocab_size)  # b still at the start
    assert ok[tok.encode("{")[0]] and not ok[tok.encode('"')[0]]


def test_tool_call_grammar_uses_the_tag_tokens(compiler, tok):
    vocab = compiler.vocab_size
    g = compiler.tool_calls([WEATHER, TIME])
    open_id, close_id = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")
    ok = allowed_after(g.constraint(), tok, [], vocab)
    assert ok.nonzero().flatten().tolist() == [open_id]  # the single added token, never "<" "tool" "_call" ">"
    one = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert tok.encode(one)[0] == open_id and tok.encode(one)[-1] == close_id
    assert accepts(g, tok, one, vocab) and accepts(g, tok, two, vocab) and accepts(g, tok, one + "\n", vocab)
    assert not accepts(g, tok, one.replace("get_time", "get_date"), vocab)  # not a tool
    assert not accepts(g, tok, one.replace('"timezone"', '"tz"'), vocab)  # extra key, required one missing
    assert not accepts(g, tok, two.replace("Oslo", "Oslo\", \"unit\": \"kelvin"), vocab)  # enum
    single = compiler.tool_calls([WEATHER, TIME], parallel=False)
    assert accepts(single, tok, one, vocab) and not accepts(single, tok, two, vocab)
    named = compiler.tool_calls([WEATHER, TIME], name="get_weather")
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert accepts(named, tok, weather, vocab) and not accepts(named, tok, one, vocab)


def test_tool_call_errors(compiler):
    with pytest.raises(BadRequest, match="'get_stock'"):
        compiler.tool_calls([WEATHER, TIME], name="get_stock")
    with pytest.raises(BadRequest, match="no tools"):
        compiler.tool_calls([])
    bad = {"type": "function", "function": {"name": "broken", "parameters": {"type": "object", "required": 3}}}
    with pytest.raises(BadRequest, match="'broken'"):
        compiler.tool_calls([WEATHER, bad])
    with pytest.raises(BadRequest, match=r"tools\[0\]"):
        compiler.tool_calls([{"type": "function"}])


def test_no_argument_tools(compiler, tok):
    now = {"type": "function", "function": {"name": "now"}}  # no parameters at all
    g = compiler.tool_calls([now])
    assert accepts(g, tok, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', compiler.vocab_size)


def test_thinking_reasoning_first_then_the_constrained_part():
    tiny = tiny_tokenizer()
    c = GrammarCompiler(tiny, tiny.vocab_size, set(tiny.stop_ids))
    g = c.json({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, thinking=True)
    v = tiny.vocab_size
    assert accepts(g, tiny, '<think>\nthe user wants {a: 1}\n</think>\n\n{"a": 1}', v)
    assert accepts(g, tiny, 'reasoning opened by the prompt</think>{"a": 2}', v)  # <think> was in the prompt
    assert not accepts(g, tiny, "<think>x</think>\n\nnot json", v)
    assert not accepts(g, tiny, '<think>x</think>{"a": 1}</think>', v)
    # Before </think> anything goes but a stop (an unfinished thought is no answer).
    ok = allowed_after(g.constraint(), tiny, "<think>{{{", v)
    assert ok[tiny.token_to_id("</think>")] and not ok[tiny.eos_token_id]
    tools = c.tool_calls([WEATHER], thinking=True)
    assert accepts(tools, tiny, '<think>ok</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
                   "</tool_call>", v)
    # Without thinking the answer comes first and </think> is never allowed.
    plain = c.json({"type": "object"})
    assert not accepts(plain, tiny, '</think>{"a": 1}', v) and accepts(plain, tiny, '{"a": 1}', v)


# ------------------------------------------------------------------------------------------- greedy generation


def generate(model, compiler, messages, constraint, tools=None):
    from qwenkit.engine.engine import GenerationRequest
    from qwenkit.engine.response import Response
    from qwenkit.engine.sampling import SamplingParams
    from qwenkit.text.stream import StreamParser

    prompt_ids = model.tokenizer.encode(model.render(messages, tools=tools))
    params = SamplingParams(temperature=0)
    parser = StreamParser(model.tokenizer, seed=0)
    total = Response()
    request = GenerationRequest(prompt_ids, params, 80, model.stop_token_ids, parser, constraint)
    for step in model.stream(request):
        total.merge(step)
    return total


@pytest.mark.real_weights
def test_generate_json_schema(model, compiler):
    ask = "Describe a person named Alice, aged 30, whose favourite colour is green, as JSON with name, color and age."
    out = generate(model, compiler, [{"role": "user", "content": ask}], compiler.json(PERSON).constraint())
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), PERSON)


@pytest.mark.real_weights
def test_generate_json_object(model, compiler):
    ask = "Give me a JSON object with the capital of France and its population."
    out = generate(model, compiler, [{"role": "user", "content": ask}], compiler.json(None).constraint())
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


@pytest.mark.real_weights
def test_generate_forced_tool_call(model, compiler):
    messages = [{"role": "user", "content": "Is it raining in Paris right now?"}]
    tools = [WEATHER, TIME]
    c = compiler.tool_calls(tools, name="get_weather", parallel=False).constraint()
    out = generate(model, compiler, messages, c, tools=tools)
    assert out.finish_reason == "tool_calls" and not out.tool_call_errors and out.text == ""
    (call,) = out.tool_calls
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


@pytest.mark.real_weights
def test_generate_required_tool_call_picks_a_tool(model, compiler):
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    tools = [WEATHER, TIME]
    out = generate(model, compiler, messages, compiler.tool_calls(tools).constraint(), tools=tools)
    assert out.finish_reason == "tool_calls" and out.tool_calls and not out.tool_call_errors
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in out.tool_calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
