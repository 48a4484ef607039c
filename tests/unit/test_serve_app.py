"""The HTTP layer in-process (Starlette's TestClient) on the tiny random model: fast checks of protocol shapes,
error mapping and the engine path, next to tests/e2e/test_serve.py which drives the real model over loopback.

A scripted model (tests/unit/test_generation.py) forces reasoning, content and tool-call text we choose.
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

pytest.importorskip("fastapi")

from starlette.testclient import TestClient  # noqa: E402

from qwenkit.errors import BadCheckpoint  # noqa: E402
from qwenkit.serve import ModelService, ServeConfig, create_app  # noqa: E402
from qwenkit.serve.errors import from_validation  # noqa: E402
from qwenkit.serve.protocol import ChatCompletionRequest  # noqa: E402
from tests.scripted import scripted  # noqa: E402

NAME = "tiny"
HELLO = [{"role": "user", "content": "hello"}]


def make_client(model, **config) -> TestClient:
    """A server over `model` (its engine keeps float32 keys and values, as the tiny_model fixture's does)."""
    config.setdefault("kv_dtype", "f32")
    service = ModelService(ServeConfig(model="tiny-path", served_model_name=NAME, **config), loader=lambda: model)
    service.start_loading()
    assert service.wait_loaded(60), service.error
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def client(tiny_model):
    with make_client(tiny_model, max_body_bytes=64 << 10) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": NAME, "messages": HELLO, **body})


def events(response) -> list:
    """The JSON payloads of an SSE body, "[DONE]" kept as a string."""
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r, status: int, *needles: str, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------------------------- engine path


def test_greedy_chat_equals_the_python_api(client, tiny_model):
    expected = tiny_model.chat(HELLO, temperature=0, max_tokens=8)
    r = chat(client, temperature=0, max_tokens=8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == NAME
    message = body["choices"][0]["message"]
    assert message["content"] == expected.text and message["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    u = expected.usage
    assert body["usage"] == {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                             "total_tokens": u.total_tokens}


def test_stream_shape_and_usage_chunk(client):
    whole = chat(client, temperature=0, max_tokens=8).json()
    r = chat(client, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "chat.completion.chunk"
                                                                    for c in chunks)


def test_n_and_seed(client):
    body = dict(temperature=1.0, seed=5, max_tokens=6, n=2)
    first, second = chat(client, **body).json(), chat(client, **body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert first["choices"] == second["choices"]  # the same seed gives the same choices
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]  # counted once, not per choice


def test_logprobs_shape(client):
    r = chat(client, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] - (r["choices"][0]["finish_reason"] == "stop")
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] <= 0 and all(0 <= b < 256 for b in entry["bytes"])


def test_completions_echo_and_logprobs(client, tiny_model):
    expected = tiny_model.generate("Hello", temperature=0, max_tokens=5)
    r = client.post("/v1/completions", json={"prompt": "Hello", "temperature": 0, "max_tokens": 5, "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello" + expected.text
    r = client.post("/v1/completions", json={"prompt": [tiny_model.tokenizer.encode("Hello")] * 2, "temperature": 0,
                                             "max_tokens": 5, "logprobs": 1}).json()
    assert [c["text"] for c in r["choices"]] == [expected.text] * 2
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 5



def test_completions_top_logprobs_keep_every_piece_of_a_character(tiny_model):
    """Tokens that are pieces of one UTF-8 character all decode to U+FFFD: keyed by that text, top_logprobs would
    fold them into one entry. Each keeps its own name, its bytes spelled out as OpenAI does."""
    from qwenkit.engine.response import Response
    from qwenkit.engine.sampling import TokenLogprob
    from qwenkit.serve.completions import CompletionFormatter

    tok = tiny_model.tokenizer
    pieces = [i for i in range(tok.vocab_size)
              if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80][:3]
    assert len(pieces) == 3
    word = tok.encode("Hello")[0]
    top = [(pieces[0], -0.5), (pieces[1], -1.0), (word, -1.5), (pieces[2], -2.0)]
    step = Response(text="\ufffd", tokens=[pieces[0]], logprobs=[TokenLogprob(pieces[0], -0.5, top)])
    lp = CompletionFormatter(tok, "m", [""]).chunk(0, step)["choices"][0]["logprobs"]
    names = ["bytes:" + "".join(f"\\x{b:02x}" for b in tok.token_bytes(i)) for i in pieces]
    assert lp["tokens"] == [names[0]]
    assert lp["top_logprobs"] == [{names[0]: -0.5, names[1]: -1.0, tok.decode([word]): -1.5, names[2]: -2.0}]

def test_tokenize_detokenize(client, tiny_model):
    r = client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == tiny_model.tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hello world"}
    prompt = client.post("/tokenize", json={"messages": HELLO}).json()
    assert prompt["count"] == chat(client, temperature=0, max_tokens=1).json()["usage"]["prompt_tokens"]


def test_metrics_count_tokens_and_free_blocks(client):
    before = metric_values(client)
    r = chat(client, temperature=0, max_tokens=3).json()
    after = metric_values(client)
    assert after["qwenkit_prompt_tokens_total"] - before["qwenkit_prompt_tokens_total"] == r["usage"]["prompt_tokens"]
    assert after["qwenkit_generation_tokens_total"] - before["qwenkit_generation_tokens_total"] == \
        r["usage"]["completion_tokens"]
    assert after["qwenkit_time_to_first_token_seconds_count"] == before["qwenkit_time_to_first_token_seconds_count"] + 1
    assert after["qwenkit_kv_blocks_used"] == 0 and after["qwenkit_requests_running"] == 0
    config = client.app.state.service.model.config  # keys and values of every layer, float32 in this server
    assert after["qwenkit_kv_bytes_per_token"] == 2 * config.num_hidden_layers * config.num_key_value_heads * \
        config.head_dim * 4


def test_speculation_keeps_the_text_and_is_counted_in_metrics(client, tiny_model):
    """A server with prompt lookup answers greedy requests with the text of a server without it; /metrics counts
    the guesses, those kept, and the tokens each decode pass gave."""
    body = dict(messages=[{"role": "user", "content": "one two three, one two three, one two three"}],
                temperature=0, max_tokens=24)
    expected = chat(client, **body).json()["choices"][0]["message"]["content"]
    speculating = make_client(tiny_model, lookup=4)
    try:
        before = metric_values(speculating)
        assert chat(speculating, **body).json()["choices"][0]["message"]["content"] == expected
        after = metric_values(speculating)
    finally:
        speculating.app.state.service.shutdown()
    kept = after["qwenkit_spec_accepted_tokens_total"] - before.get("qwenkit_spec_accepted_tokens_total", 0)
    guessed = after["qwenkit_spec_draft_tokens_total"] - before.get("qwenkit_spec_draft_tokens_total", 0)
    passes = after["qwenkit_decode_passes_total"] - before.get("qwenkit_decode_passes_total", 0)
    assert 0 < kept <= guessed
    assert after["qwenkit_decode_tokens_total"] - before.get("qwenkit_decode_tokens_total", 0) == passes + kept


def metric_values(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(qwenkit_\w+) (\S+)$", text, re.M)}


# --------------------------------------------------------------------------------------------- scripted output


def scripted_client(tiny_model, text: str) -> TestClient:
    tok = tiny_model.tokenizer
    script = tok.encode(text) + [tok.token_to_id("<|im_end|>")]
    return make_client(scripted(tiny_model, script))


# Calls are parsed from any chat answer; tools stay out of these prompts, which must fit the tiny 256-token context.
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_reasoning_content_and_tool_calls(tiny_model):
    with scripted_client(tiny_model, f"<think>\nLet me see.\n</think>\n\nChecking.{CALL}") as c:
        message = chat(c, temperature=0, max_tokens=100).json()["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    m = message["message"]
    assert m["reasoning_content"] == "Let me see." and m["content"] == "Checking."
    (call,) = m["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_reasoning_and_tool_calls_stream_as_deltas(tiny_model):
    with scripted_client(tiny_model, f"<think>\nHmm.\n</think>\n\n{CALL}") as c:
        chunks = events(chat(c, temperature=0, max_tokens=100, stream=True))[:-1]
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Hmm."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_never_calls(tiny_model):
    with scripted_client(tiny_model, CALL) as c:
        r = chat(c, temperature=0, max_tokens=6, tools=TOOLS, tool_choice="none").json()
    assert "tool_calls" not in r["choices"][0]["message"] and r["choices"][0]["finish_reason"] != "tool_calls"


def test_malformed_tool_call_comes_back_as_content(tiny_model):
    with scripted_client(tiny_model, "<tool_call>\nnot json\n</tool_call>") as c:
        m = chat(c, temperature=0, max_tokens=60).json()["choices"][0]["message"]
    assert "tool_calls" not in m and m["content"] == "<tool_call>\nnot json\n</tool_call>"


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, needle, param, code", [
    ({"messages": HELLO, "temperature": "hot"}, "temperature", "temperature", "invalid_type"),
    ({"messages": HELLO, "max_tokenz": 3}, "unknown field 'max_tokenz'", "max_tokenz", "unknown_parameter"),
    ({"messages": [{"role": "user", "content": "x", "colour": 1}]}, "messages[0].colour", "messages[0].colour",
     "unknown_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "messages[0].content", "invalid_type"),
    ({"messages": HELLO, "functions": []}, "not supported", "functions", "unsupported_parameter"),
    ({"messages": HELLO, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "stream_options.x",
     "unknown_parameter"),
    ({}, "missing required field 'messages'", "messages", "missing_parameter"),
    ({"messages": HELLO, "temperature": -1}, "temperature must be >= 0", "temperature", None),
    ({"messages": HELLO, "top_logprobs": 2}, "requires logprobs", None, None),
    ({"messages": HELLO, "tool_choice": "required"}, "tools", None, None),
    ({"messages": [{"role": "tool", "content": None}]}, "messages[0].content", "messages[0].content", None),
])
def test_bad_fields_are_400_naming_the_field(client, body, needle, param, code):
    assert_error(client.post("/v1/chat/completions", json=body), 400, needle, param=param, code=code)


def test_malformed_json_and_non_object(client):
    assert_error(client.post("/v1/chat/completions", content=b'{"messages": ['), 400, "not valid JSON")
    assert_error(client.post("/v1/chat/completions", content=b"[1, 2]"), 400, "JSON object")


def test_context_length_body_size_model_and_route(client):
    long = [{"role": "user", "content": "hello " * 300}]  # the tiny model's context is 256 tokens
    assert_error(chat(client, messages=long), 400, code="context_length_exceeded")
    assert_error(client.post("/v1/completions", json={"prompt": "x" * (65 << 10)}), 413)
    assert_error(chat(client, model="gpt-4"), 404, "gpt-4", code="model_not_found")
    assert_error(client.get("/v1/nowhere"), 404)
    assert chat(client, temperature=0, max_tokens=2).status_code == 200  # and it still answers


def test_api_key(tiny_model):
    with make_client(tiny_model, api_key="sk-secret") as c:
        assert c.get("/health").status_code == 200
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
        assert_error(c.get("/metrics", headers={"Authorization": "Basic sk-secret"}), 401)
        r = c.get("/v1/models", headers={"Authorization": "Bearer sk-secret"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == NAME


def test_503_while_loading(tiny_model):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_model

    service = ModelService(ServeConfig(model="tiny-path"), loader=slow_loader)
    service.start_loading()
    with TestClient(create_app(service)) as c:
        r = c.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        assert_error(chat(c, model=None, max_tokens=1), 503, "loading", code="model_loading")
        release.set()
        assert service.wait_loaded(30)
        assert c.get("/health").status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}).status_code == 200


def test_failed_load_is_503_with_the_reason():
    def broken():
        raise BadCheckpoint("model.gguf: truncated")

    service = ModelService(ServeConfig(model="model.gguf"), loader=broken)
    service.start_loading()
    service.wait_loaded(10)
    with TestClient(create_app(service)) as c:
        assert (c.get("/health").status_code, c.get("/health").json()) == (503, {"status": "failed"})
        assert_error(c.get("/v1/models"), 503, "truncated", code="model_load_failed")
    assert service.state == "failed"  # shutting down keeps the reason the server exits with


def test_logit_bias_moves_the_choice_and_bad_biases_are_400(client, tiny_model):
    token = tiny_model.chat(HELLO, temperature=0, max_tokens=1).tokens[0]
    first = chat(client, temperature=0, max_tokens=1, logprobs=True).json()["choices"][0]["logprobs"]["content"][0]
    assert first["bytes"] == list(tiny_model.tokenizer.token_bytes(token))
    other = chat(client, temperature=0, max_tokens=1, logprobs=True, logit_bias={str(token): -100}).json()
    other = other["choices"][0]["logprobs"]["content"][0]
    assert other["bytes"] != first["bytes"]
    assert other["logprob"] < first["logprob"]  # logprobs stay the model's own: the banned token was the likeliest
    vocab = tiny_model.config.vocab_size
    assert_error(chat(client, logit_bias={str(vocab): 5}), 400, "outside the vocabulary")
    assert_error(chat(client, logit_bias={"abc": 5}), 400, "logit_bias")
    assert_error(chat(client, logit_bias={"3": 500}), 400, "-100 to 100")


def test_lora_adapters_are_models_a_request_chooses(tiny_hf_path, tmp_path):
    """--lora NAME=PATH: /v1/models lists each adapter with the base as parent; model=NAME answers with it."""
    import qwenkit
    from tests.fixtures_tiny import float32_engine
    from tests.unit.test_adapters import trained_adapter

    folder = trained_adapter(tiny_hf_path, tmp_path / "support", seed=5)
    reference = float32_engine(qwenkit.load(tiny_hf_path, pull=False))  # the KV dtype make_client's server keeps
    base_answer = reference.chat(HELLO, temperature=0, max_tokens=8).text
    from qwenkit.tune.lora import load_adapter

    load_adapter(reference.model, folder)
    float32_engine(reference)  # the weights changed: a fresh engine, whose prefix cache holds nothing of the base's
    adapted_answer = reference.chat(HELLO, temperature=0, max_tokens=8).text
    assert adapted_answer != base_answer
    with make_client(qwenkit.load(tiny_hf_path, pull=False), lora={"support": str(folder)}) as c:
        models = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [(NAME, None), ("support", NAME)]
        assert models[1]["root"] == str(folder)
        r = c.post("/v1/chat/completions", json={"model": "support", "messages": HELLO, "temperature": 0,
                                                 "max_tokens": 8})
        assert r.status_code == 200 and r.json()["model"] == "support"
        assert r.json()["choices"][0]["message"]["content"] == adapted_answer
        assert chat(c, temperature=0, max_tokens=8).json()["choices"][0]["message"]["content"] == base_answer
        r = c.post("/v1/completions", json={"model": "support", "prompt": "Hello", "temperature": 0, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "support"
        assert_error(c.post("/v1/chat/completions", json={"model": "other", "messages": HELLO}), 404,
                     "'tiny', 'support'", code="model_not_found")


def test_an_adapter_that_does_not_load_fails_the_server(tiny_hf_path, tmp_path):
    import qwenkit

    service = ModelService(ServeConfig(model="tiny-path", served_model_name=NAME, lora={"x": str(tmp_path)}),
                           loader=lambda: qwenkit.load(tiny_hf_path, pull=False))
    service.start_loading()
    service.wait_loaded(30)
    assert service.state == "failed" and "adapter_config.json" in str(service.error)


def test_validation_error_paths_drop_union_member_names():
    with pytest.raises(Exception) as e:
        ChatCompletionRequest.model_validate_json('{"messages": [{"role": "user", "content": [{"type": "img"}]}]}')
    err = from_validation(e.value)
    assert err.param == "messages[0].content[0].type", err
