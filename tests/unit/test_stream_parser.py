"""StreamParser on a tiny byte-level vocabulary that has Qwen's think / tool-call tokens.

Text is encoded with the tiny tokenizer (mostly one byte per token, so Chinese and emoji arrive in pieces and the
IncrementalDecoder yields '' for some tokens) and fed token by token, exactly as the engine does.
"""

import json
import re

import pytest

from qwenkit.text.stream import ContentDelta, ReasoningDelta, StreamParser, ToolCall, ToolCallError
from qwenkit.text.tokenizer import IncrementalDecoder, Tokenizer, _byte_alphabet

SPECIALS = [  # (text, gguf token type): 3 control, 4 user-defined, as in Qwen GGUFs
    ("<|endoftext|>", 3),
    ("<|im_start|>", 3),
    ("<|im_end|>", 3),
    ("<tool_call>", 4),
    ("</tool_call>", 4),
    ("<think>", 4),
    ("</think>", 4),
]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ Ġ", "Ċ Ċ", "a m", "n a", "m e", "na me"]


def tiny_meta(specials=SPECIALS, merges=MERGES) -> dict:
    """GGUF-style tokenizer metadata: the 256 byte tokens, a few merges, then the added tokens."""
    tokens = list(_byte_alphabet().values())
    types = [1] * len(tokens)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
            types.append(1)
    for text, ty in specials:
        tokens.append(text)
        types.append(ty)
    ids = {t: i for i, t in enumerate(tokens)}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.eos_token_id": ids.get("<|im_end|>", 0),
        "tokenizer.ggml.bos_token_id": ids.get("<|endoftext|>", 0),
        "tokenizer.ggml.padding_token_id": ids.get("<|endoftext|>", 0),
    }


def tiny_tokenizer(**kw) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_meta(**kw), "tiny.gguf")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def run(tok, text, *, in_reasoning=False, seed=0, deltas=None):
    """Feed `text` token by token through IncrementalDecoder + StreamParser; return all events."""
    parser = StreamParser(tok, in_reasoning=in_reasoning, seed=seed)
    dec = IncrementalDecoder(tok)
    events = []
    for tid in tok.encode(text):
        delta = dec.push(tid)
        if deltas is not None:
            deltas.append(delta)
        events += parser.feed(tid, delta)
    events += parser.feed(None, dec.flush())
    events += parser.finish()
    return events


def merged(events):
    """Adjacent deltas of one kind joined: [('reasoning', text) | ('content', text) | event]."""
    out = []
    for e in events:
        kind = {ReasoningDelta: "reasoning", ContentDelta: "content"}.get(type(e))
        if kind and out and isinstance(out[-1], tuple) and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + e.text)
        elif kind:
            out.append((kind, e.text))
        else:
            out.append(e)
    return out


def strip_ids(items):
    return [
        (type(e).__name__, e.index, e.name, json.loads(e.arguments)) if isinstance(e, ToolCall) else e for e in items
    ]


def call(name, args=None, raw_args=None):
    body = {"name": name}
    if args is not None:
        body["arguments"] = args
    text = json.dumps(body, ensure_ascii=False) if raw_args is None else raw_args
    return f"<tool_call>\n{text}\n</tool_call>"


def test_think_then_content(tok):
    out = merged(run(tok, "<think>\nThe user says hello. 你好 👋\n</think>\n\nHello there! 😀"))
    assert out == [("reasoning", "The user says hello. 你好 👋"), ("content", "Hello there! 😀")]


def test_prompt_opened_think(tok):
    out = merged(run(tok, "\nhmm, 2+2=4\n</think>\n\nIt is 4.", in_reasoning=True))
    assert out == [("reasoning", "hmm, 2+2=4"), ("content", "It is 4.")]
    assert StreamParser.prompt_in_reasoning(tok, tok.encode("<|im_start|>assistant\n<think>\n"))
    assert not StreamParser.prompt_in_reasoning(tok, tok.encode("assistant\n<think>\n\n</think>\n\n"))
    assert not StreamParser.prompt_in_reasoning(tok, tok.encode("<|im_start|>assistant\n"))


def test_thinking_off(tok):
    # Qwen3 with enable_thinking=False: the empty think block is in the prompt, the reply is plain content.
    assert merged(run(tok, "Paris.")) == [("content", "Paris.")]
    # ... or the model writes an empty block itself: nothing but the content comes out.
    assert merged(run(tok, "<think>\n\n</think>\n\nParis.")) == [("content", "Paris.")]


def test_tool_call_inside_think(tok):
    text = (
        "<think>I need the weather.\n"
        + call("get_weather", {"city": "Paris"})
        + "\nGot it, now answer.</think>\n\nIt is sunny."
    )
    out = strip_ids(merged(run(tok, text)))
    assert out == [
        ("reasoning", "I need the weather."),
        ("ToolCall", 0, "get_weather", {"city": "Paris"}),
        ("reasoning", "Got it, now answer."),
        ("content", "It is sunny."),
    ]


def test_two_calls_in_one_reply(tok):
    text = "Let me check both.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"tz": "東京"})
    text += "\n"
    out = strip_ids(merged(run(tok, text)))
    assert out == [
        ("content", "Let me check both."),
        ("ToolCall", 0, "get_weather", {"city": "Paris"}),
        ("ToolCall", 1, "get_time", {"tz": "東京"}),
    ]


def test_no_argument_tools(tok):
    events = run(tok, call("now") + call("now", {}) + call("now", raw_args='{"name": "now", "arguments": null}'))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("now", "{}")] * 3
    assert [c.index for c in calls] == [0, 1, 2]
    assert not [e for e in events if not isinstance(e, ToolCall)]


def test_arguments_as_json_string(tok):
    raw = json.dumps({"name": "add", "arguments": json.dumps({"a": 1, "b": [2, "三"]})})
    (c,) = [e for e in run(tok, call("add", raw_args=raw)) if isinstance(e, ToolCall)]
    assert json.loads(c.arguments) == {"a": 1, "b": [2, "三"]}
    assert "三" in c.arguments  # not \u-escaped


@pytest.mark.parametrize(
    "raw, why",
    [
        ('{"name": "f", "arguments": {"a": 1}', "not valid JSON"),
        ('{"arguments": {"a": 1}}', "name"),
        ('{"name": "f", "arguments": [1, 2]}', "JSON object"),
        ('{"name": "f", "arguments": "not json"}', "not JSON"),
        ('["f"]', "JSON object"),
        ('{"name": "f", "arguments": {"x": NaN}}', "JSON"),
        ("", "empty"),
    ],
)
def test_malformed_calls(tok, raw, why):
    text = "Before." + call("x", raw_args=raw) + call("ok", {"v": 1}) + "After."
    out = merged(run(tok, text))
    assert out[0] == ("content", "Before.")
    err = out[1]
    assert isinstance(err, ToolCallError) and why in err.message and err.raw.strip() == raw and err.index == 0
    assert isinstance(out[2], ToolCall) and out[2].index == 0 and out[2].name == "ok"
    assert out[3] == ("content", "After.")


def test_unterminated_call(tok):
    out = merged(run(tok, 'Sure.\n<tool_call>\n{"name": "f", "argu'))
    assert out[0] == ("content", "Sure.")
    assert isinstance(out[1], ToolCallError) and "unterminated" in out[1].message
    assert out[1].raw == '\n{"name": "f", "argu'
    assert len(out) == 2


def test_call_interrupted_by_think_close(tok):
    out = merged(run(tok, '<think>hmm<tool_call>{"name": "f"</think>Answer'))
    assert out[0] == ("reasoning", "hmm")
    assert isinstance(out[1], ToolCallError) and "</think>" in out[1].message
    assert out[2] == ("content", "Answer")


def test_token_at_a_time_with_empty_deltas(tok):
    text = "<think>思考 🧑‍💻</think>答案: 👍🏽 done"
    deltas = []
    events = run(tok, text, deltas=deltas)
    assert "" in deltas  # multi-byte characters arrive over several tokens
    assert all(e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta)))
    assert merged(events) == [("reasoning", "思考 🧑‍💻"), ("content", "答案: 👍🏽 done")]
    # every character comes out whole
    assert all("\ufffd" not in e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta)))


def test_whitespace_rules(tok):
    p = StreamParser(tok, seed=1)
    t = tok.token_to_id
    sp = tok.encode(" ")[0]
    nl = tok.encode("\n")[0]
    h = tok.encode("H")[0]
    assert p.feed(h, "H") == [ContentDelta("H")]  # non-whitespace is never delayed
    assert p.feed(nl, "\n") == []  # trailing whitespace waits
    assert p.feed(h, "i") == [ContentDelta("\ni")]  # ... and comes out with the next text
    assert p.feed(sp, "  ") == []
    events = p.feed(t("<tool_call>"), "<tool_call>")
    assert events == []  # whitespace before a tag is dropped
    p.feed(h, '{"name": "f"}')
    (c,) = p.feed(t("</tool_call>"), "</tool_call>")
    assert isinstance(c, ToolCall)
    assert p.feed(nl, "\n\n") == []  # after a tag: leading whitespace dropped
    assert p.feed(h, "x ") == [ContentDelta("x")]
    assert p.finish() == [ContentDelta(" ")]  # trailing whitespace of the reply is kept at the end
    assert p.finish() == []


def test_whitespace_only_reply_and_segments(tok):
    assert merged(run(tok, "  \n")) == []
    assert strip_ids(merged(run(tok, "\n" + call("f") + "\n\n"))) == [("ToolCall", 0, "f", {})]
    assert merged(run(tok, "  leading kept")) == [("content", "  leading kept")]


def test_tag_delta_carrying_earlier_text(tok):
    # A decoder may release held-back text together with the tag token's own text.
    p = StreamParser(tok)
    t = tok.token_to_id
    assert p.feed(t("<think>"), "<think>") == []
    assert p.feed(1, "") == []
    assert p.feed(t("</think>"), "é</think>") == [ReasoningDelta("é")]
    assert p.feed(2, "ok") == [ContentDelta("ok")]


def test_vocabulary_without_tags_is_all_content():
    plain = tiny_tokenizer(specials=[("<|im_end|>", 3)])
    assert merged(run(plain, "<think>x</think> <tool_call>{}</tool_call>")) == [
        ("content", "<think>x</think> <tool_call>{}</tool_call>")
    ]


def test_call_ids_seeded_and_well_formed(tok):
    text = call("a") + call("b")
    ids1 = [e.id for e in run(tok, text, seed=7) if isinstance(e, ToolCall)]
    ids2 = [e.id for e in run(tok, text, seed=7) if isinstance(e, ToolCall)]
    ids3 = [e.id for e in run(tok, text, seed=None) if isinstance(e, ToolCall)]
    assert ids1 == ids2 and ids1 != ids3 and len(set(ids1)) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids1 + ids3)


def test_never_raises_on_garbage(tok):
    import random

    rng = random.Random(0)
    tags = [tok.token_to_id(s) for s in ("<think>", "</think>", "<tool_call>", "</tool_call>")]
    for _ in range(200):
        p = StreamParser(tok, in_reasoning=rng.random() < 0.5, seed=0)
        dec = IncrementalDecoder(tok)
        for _ in range(rng.randrange(1, 40)):
            tid = rng.choice(tags) if rng.random() < 0.2 else rng.randrange(tok.vocab_size)
            p.feed(tid, dec.push(tid))
        p.feed(None, dec.flush())
        p.finish()
