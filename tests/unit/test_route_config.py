"""The router's parts without a network: route.yaml parsing (errors name the line), the circuit breaker, the chat
template's continue_final_message, and the failover policy over scripted in-process backends."""

from __future__ import annotations

import asyncio

import pytest

from qwenkit.errors import BadConfig, BadRequest
from qwenkit.route.backends import Backend, BackendError, BackendRejected, NativeBackend
from qwenkit.route.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from qwenkit.route.config import BackendConfig, RouteConfig, parse_route
from qwenkit.route.router import AllBackendsFailed, Router

GOOD = """\
probe_interval: 2
served_model_name: qwen
backends:
  - name: hosted
    type: openai
    base_url: https://example.com/v1/
    api_key: sk-1
    model: big
    aliases: {coder: big-coder}
    retries: 2
    breaker: {failures: 4, cooldown: 10}
  - name: device
    type: native
    model: qwen2.5-coder:0.5b
    threads: 2
    lora: {support: ./adapters/support}
"""


def test_parse_good_file():
    cfg = parse_route(GOOD, "route.yaml")
    assert cfg.probe_interval == 2 and cfg.served_model_name == "qwen"
    hosted, device = cfg.backends
    assert hosted.base_url == "https://example.com"  # a trailing /v1 is accepted: the router appends it
    assert hosted.model_for("coder") == "big-coder" and hosted.model_for("other") == "big"
    assert (hosted.retries, hosted.breaker.failures, hosted.breaker.cooldown) == (2, 4, 10.0)
    assert device.type == "native" and device.threads == 2 and device.line == 12
    assert device.lora == {"support": "./adapters/support"}
    assert device.model_for("support") == "support" and device.model_for("coder") == "qwen2.5-coder:0.5b"


def test_api_key_env(monkeypatch):
    text = "backends:\n  - {name: h, type: openai, base_url: 'http://h', api_key_env: ROUTE_TEST_KEY}\n"
    monkeypatch.setenv("ROUTE_TEST_KEY", "sk-env")
    assert parse_route(text).backends[0].api_key == "sk-env"
    monkeypatch.delenv("ROUTE_TEST_KEY")
    with pytest.raises(BadConfig, match=r"^r.yaml:2: environment variable ROUTE_TEST_KEY"):
        parse_route(text, "r.yaml")


@pytest.mark.parametrize("text, line, needle", [
    ("backends:\n  - name: a\n    type: vllm\n", 3, "unknown backend type 'vllm'"),
    ("backends:\n  - name: a\n    type: openai\n    model: m\n", 2, "has no 'base_url'"),
    ("backends:\n  - name: a\n    type: openai\n    base_url: ftp://x\n", 4, "must start with http"),
    ("backends:\n  - {name: a, type: native, model: x}\n  - name: a\n    type: native\n    model: y\n", 3,
     "backend name 'a' is used twice (first on line 2)"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    colour: red\n", 5, "unknown key 'colour'"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    retries: many\n", 5, "'retries' must be"),
    ("backends:\n  - name: a\n    type: native\n", 2, "has no 'model'"),
    ("backend:\n  - name: a\n", 1, "unknown key 'backend'"),
    ("backends: []\n", 1, "non-empty list"),
    ("backends:\n  - name: a\n    type: [\n", 4, "not valid YAML"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    breaker: {failures: 0}\n", 5, "at least 1"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    lora: [x]\n", 5,
     "'lora' must map adapter names to adapter folders"),
    ("backends:\n  - name: a\n    type: openai\n    base_url: http://h\n    lora: {x: y}\n", 5, "unknown key 'lora'"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    lookup: 99\n", 5, "'lookup' must be at most 16"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    images: blur\n", 5,
     "'images' must be one of: refuse, drop; got 'blur'"),
    ("backends:\n  - name: a\n    type: openai\n    model: y\n    base_url: http://h\n    images: drop\n", 6,
     "images"),
    ("backends:\n  - name: a\n    type: native\n    model: y\n    draft_tokens: 0\n", 5, "'draft_tokens' must be"),
    ("backends:\n  - name: a\n    type: openai\n    base_url: http://h\n    draft: m\n", 5, "unknown key 'draft'"),
])
def test_bad_config_names_the_line(text, line, needle):
    with pytest.raises(BadConfig) as e:
        parse_route(text, "route.yaml")
    assert str(e.value).startswith(f"route.yaml:{line}: "), str(e.value)
    assert needle in str(e.value)


def test_breaker_cycle():
    now = [0.0]
    b = Breaker(failures=2, cooldown=5, clock=lambda: now[0])
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    now[0] = 5.0
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # one trial at a time
    b.failure()  # the trial failed: open again for a full cooldown
    assert b.state == OPEN
    now[0] = 10.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.failures == 0



def test_probes_close_an_open_breaker_but_never_clear_request_failures():
    now = [0.0]
    b = Breaker(failures=3, cooldown=60, clock=lambda: now[0])
    b.failure(), b.failure()
    b.probe(True)  # /health answers between two failed completions: the count stands
    assert b.failures == 2 and b.state == CLOSED
    b.failure()
    assert b.state == OPEN  # `failures` failed requests take the host out, probes or not
    b.probe(True)
    assert b.state == CLOSED  # a probe closes an open breaker (a host that came back)...
    b.failure()
    assert b.state == OPEN  # ...and the next failed request reopens it at once
    b.probe(True)
    assert b.state == OPEN  # health and completions disagree: probes are no longer believed
    now[0] = 60.0
    assert b.allow()  # the half-open trial decides
    b.success()
    assert b.state == CLOSED and b.failures == 0
    b.failure(), b.failure(), b.failure()
    b.probe(False)  # the host went down...
    b.probe(True)  # ...and came back: believed
    assert b.state == CLOSED

# ---- continue_final_message --------------------------------------------------------------------------------------
def test_continue_final_message_leaves_the_answer_open(tiny_model):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, wor"}]
    text = tiny_model.render(conv, add_generation_prompt=False, continue_final_message=True)
    closed = tiny_model.render(conv, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nHello, wor")
    assert closed.startswith(text) and closed[len(text):] == "<|im_end|>\n"
    # trailing spaces are the answer's own: kept
    spaced = tiny_model.render([conv[0], {"role": "assistant", "content": "Hello "}], add_generation_prompt=False,
                               continue_final_message=True)
    assert spaced.endswith("assistant\nHello ")
    empty = tiny_model.render([conv[0], {"role": "assistant", "content": ""}], add_generation_prompt=False,
                              continue_final_message=True)
    assert empty == tiny_model.render(conv[:1])  # the same open assistant turn as a generation prompt
    with pytest.raises(BadRequest, match="add_generation_prompt"):
        tiny_model.render(conv, continue_final_message=True)
    with pytest.raises(BadRequest, match="assistant"):
        tiny_model.render(conv[:1], add_generation_prompt=False, continue_final_message=True)


def test_server_accepts_continue_final_message(tiny_model):
    from tests.unit.test_serve_app import NAME, make_client

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    with make_client(tiny_model) as c:
        r = c.post("/v1/chat/completions", json={"model": NAME, "messages": conv, "temperature": 0, "max_tokens": 6,
                                                 "add_generation_prompt": False, "continue_final_message": True})
        assert r.status_code == 200, r.text
        expected = tiny_model.chat(conv, temperature=0, max_tokens=6, add_generation_prompt=False,
                                   continue_final_message=True).text
        assert r.json()["choices"][0]["message"]["content"] == expected
        r = c.post("/v1/chat/completions", json={"model": NAME, "messages": conv, "continue_final_message": True})
        assert r.status_code == 400 and "add_generation_prompt" in r.json()["error"]["message"]


# ---- the failover policy over scripted backends ------------------------------------------------------------------
def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class Scripted(Backend):
    """Yields its script; an Exception in it is raised there, a float is a pause (a stall) in seconds."""

    def __init__(self, name: str, script: list, remote: bool = True, **opts):
        super().__init__(BackendConfig(name=name, type="openai", base_url="http://x", **opts))
        self.script, self.remote, self.requests = script, remote, []

    async def probe(self) -> bool:
        return True

    async def stream(self, body):
        self.requests.append(body)
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            yield item


def run(router: Router, body: dict) -> list[dict]:
    async def go():
        return [c async for c in router.stream(body)]

    return asyncio.run(go())


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_mid_stream_cut_continues_with_the_partial_answer():
    a = Scripted("a", [chunk(role=True), chunk("Hel"), chunk("lo"), BackendError("a", "connection lost")])
    b = Scripted("b", [chunk(role=True), chunk(", world"), chunk(finish="stop")], remote=False)
    out = run(Router(RouteConfig([a.config, b.config]), [a, b]), BODY)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"])
    assert text == "Hello, world"
    assert sum(1 for c in out for ch in c["choices"] if ch["delta"].get("role")) == 1  # one opening, not two
    assert len({c["id"] for c in out}) == 1
    assert out[-1]["qwenkit_backends"] == ["a", "b"] and out[-1]["choices"][0]["finish_reason"] == "stop"
    cont = b.requests[0]
    assert cont["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False


def test_stall_past_inter_token_timeout_fails_over():
    a = Scripted("a", [chunk(role=True), chunk("Hi"), 5.0, chunk("late")], inter_token_timeout=0.2)
    b = Scripted("b", [chunk(" there", finish="stop")])
    out = run(Router(RouteConfig([a.config, b.config]), [a, b]), BODY)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"]) == "Hi there"
    assert a.breaker.failures == 1


def test_retries_then_next_and_open_breakers_are_skipped():
    a = Scripted("a", [BackendError("a", "HTTP 503", 503)], retries=2, backoff=0.01)
    b = Scripted("b", [chunk("ok", finish="stop")])
    router = Router(RouteConfig([a.config, b.config]), [a, b])
    assert run(router, BODY)[-1]["qwenkit_backends"] == ["b"]
    assert len(a.requests) == 3
    a.breaker.trip()
    assert run(router, BODY)[-1]["qwenkit_backends"] == ["b"]
    assert len(a.requests) == 3  # skipped: offline mode waits on nothing


def test_rejections_go_to_the_client_and_total_failure_is_reported():
    bad = {"error": {"message": "unknown field", "type": "invalid_request_error"}}
    a = Scripted("a", [BackendRejected("a", 400, bad)])
    b = Scripted("b", [chunk("never", finish="stop")])
    with pytest.raises(BackendRejected):
        run(Router(RouteConfig([a.config, b.config]), [a, b]), BODY)
    assert not b.requests
    c = Scripted("c", [BackendError("c", "refused")])
    with pytest.raises(AllBackendsFailed, match="c: refused"):
        run(Router(RouteConfig([c.config]), [c]), BODY)


def test_complete_aggregates_across_backends():
    a = Scripted("a", [chunk(role=True), chunk("Hel"), BackendError("a", "lost")])
    b = Scripted("b", [chunk("lo", finish="stop")])
    result, served = asyncio.run(Router(RouteConfig([a.config, b.config]), [a, b]).complete(BODY))
    assert result["choices"][0]["message"]["content"] == "Hello" and served == ["a", "b"]
    assert result["qwenkit_backends"] == ["a", "b"]


def test_continue_final_message_reasoning_and_tool_calls(tiny_qwen3_model):
    from qwenkit.text.stream import StreamParser

    m = tiny_qwen3_model
    user = {"role": "user", "content": "hi"}
    thinking = m.render([user, {"role": "assistant", "content": "", "reasoning_content": "Let me th"}],
                        add_generation_prompt=False, continue_final_message=True)
    assert thinking.endswith("<think>\nLet me th")  # still reasoning: the model goes on inside <think>
    assert StreamParser.prompt_in_reasoning(m.tokenizer, m.tokenizer.encode(thinking))
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    called = m.render([user, {"role": "assistant", "content": "", "reasoning_content": "ok", "tool_calls": [call]}],
                      add_generation_prompt=False, continue_final_message=True)
    assert called.endswith('{"name": "f", "arguments": {"a": 1}}\n</tool_call>')


def test_reasoning_and_tool_calls_survive_the_switch():
    def call(index: int, name: str) -> dict:
        c = chunk()
        c["choices"][0]["delta"] = {"tool_calls": [{"index": index, "id": f"id-{name}", "type": "function",
                                                    "function": {"name": name, "arguments": "{}"}}]}
        return c

    think = chunk()
    think["choices"][0]["delta"] = {"reasoning_content": "Hmm."}
    a = Scripted("a", [chunk(role=True), think, call(0, "first"), BackendError("a", "lost")])
    b = Scripted("b", [chunk(role=True), call(0, "second"), chunk(finish="tool_calls")])
    out = run(Router(RouteConfig([a.config, b.config]), [a, b]), BODY)
    indices = [(c["index"], c["function"]["name"]) for o in out for ch in o["choices"]
               for c in ch["delta"].get("tool_calls", [])]
    assert indices == [(0, "first"), (1, "second")]  # the continuation's calls are numbered after the first
    partial = b.requests[0]["messages"][-1]
    assert partial["reasoning_content"] == "Hmm." and partial["tool_calls"][0]["function"]["name"] == "first"


def test_route_app_over_scripted_backends():
    import json

    from starlette.testclient import TestClient

    from qwenkit.serve.route_app import BACKENDS_HEADER, create_route_app

    a = Scripted("a", [chunk(role=True), chunk("Hel"), BackendError("a", "lost")])
    b = Scripted("b", [chunk("lo", finish="stop")], aliases={"coder": "b-coder"}, lora={"support": "/a/support"})
    app = create_route_app(Router(RouteConfig([a.config, b.config], probe_interval=3600), [a, b]))
    with TestClient(app) as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"  # OpenAI-style, as serve
        assert c.get("/v1/chat/completions").status_code == 405
        listed = c.get("/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in listed] == [("qwenkit-router", None), ("coder", None),
                                                             ("support", "qwenkit-router")]
        r = c.post("/v1/chat/completions", json={**BODY, "stream": True})
        assert r.status_code == 200 and r.headers[BACKENDS_HEADER] == "a"
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "Hello"
        assert events[-1]["qwenkit_backends"] == ["a", "b"] and r.text.rstrip().endswith("data: [DONE]")
        a.script = b.script = [BackendError("x", "HTTP 500", 500)]
        r = c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 503 and "no backend could serve" in r.json()["error"]["message"]
        a.script = [BackendRejected("a", 400, {"error": {"message": "bad field"}})]
        r = c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 400 and r.json()["error"]["message"] == "bad field"
        assert c.get("/health").json()["backends"] == {"a": "closed", "b": "closed"}
        r = c.post("/v1/chat/completions", json={**BODY, "model": ["m"]})
        assert r.status_code == 400 and r.json()["error"]["message"] == "'model' must be a string, not list"
    with TestClient(create_route_app(Router(RouteConfig([b.config], probe_interval=3600), [b]), api_key="k")) as c:
        assert c.post("/v1/chat/completions", json=BODY).status_code == 401
        b.script = [chunk("ok", finish="stop")]
        r = c.post("/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
        assert r.headers[BACKENDS_HEADER] == "b" and c.get("/health").status_code == 200


def test_equal_priority_backends_fastest_first():
    cfg = parse_route("backends:\n  - {name: a, type: native, model: x, priority: 1}\n"
                      "  - {name: b, type: native, model: y, priority: 1}\n  - {name: c, type: native, model: z}\n")
    assert [b.priority for b in cfg.backends] == [1, 1, 2000]
    a, b, c = (Scripted(n, [chunk("ok", finish="stop")], priority=p) for n, p in (("a", 1), ("b", 1), ("c", 2000)))
    router = Router(RouteConfig([a.config, b.config, c.config]), [a, b, c])
    assert [x.name for x in router._ordered()] == ["a", "b", "c"]
    a.observe_latency(0.5)
    b.observe_latency(0.1)
    assert [x.name for x in router._ordered()] == ["b", "a", "c"]
    assert run(router, BODY)[-1]["qwenkit_backends"] == ["b"]


def test_a_refused_continuation_moves_on():
    a = Scripted("a", [chunk(role=True), chunk("Hel"), BackendError("a", "lost")])
    b = Scripted("b", [BackendRejected("b", 400, {"error": {"message": "unknown field 'continue_final_message'"}})])
    c = Scripted("c", [chunk("lo", finish="stop")])
    out = run(Router(RouteConfig([a.config, b.config, c.config]), [a, b, c]), BODY)
    assert out[-1]["qwenkit_backends"] == ["a", "c"]


def test_continuation_gets_what_is_left_of_max_tokens():
    def cut() -> list:
        return [chunk(role=True), chunk("Hel"), chunk("lo"), chunk(" w"), BackendError("a", "lost")]

    # No tokenizer in this process: each streamed chunk with text counts as one token (3 here).
    for key in ("max_tokens", "max_completion_tokens"):
        a, b = Scripted("a", cut()), Scripted("b", [chunk("orld", finish="stop")])
        out = run(Router(RouteConfig([a.config, b.config]), [a, b]), {**BODY, key: 10})
        assert b.requests[0][key] == 7 and out[-1]["choices"][0]["finish_reason"] == "stop"
    # max_completion_tokens wins over max_tokens (as in the server); both fields carry what is left
    a, b = Scripted("a", cut()), Scripted("b", [chunk("orld", finish="stop")])
    run(Router(RouteConfig([a.config, b.config]), [a, b]), {**BODY, "max_tokens": 100, "max_completion_tokens": 5})
    assert (b.requests[0]["max_tokens"], b.requests[0]["max_completion_tokens"]) == (2, 2)

    # With an on-device tokenizer, it counts the partial answer (here: one token per character, 7).
    class Device(Scripted):
        def token_counter(self):
            return len

    a, d = Scripted("a", cut()), Device("d", [chunk("orld", finish="stop")], remote=False)
    run(Router(RouteConfig([a.config, d.config]), [a, d]), {**BODY, "max_tokens": 10})
    assert d.requests[0]["max_tokens"] == 3

    # Nothing left: the answer ends with finish_reason "length", and the next backend is not called.
    a, b = Scripted("a", cut()), Scripted("b", [chunk("never", finish="stop")])
    out = run(Router(RouteConfig([a.config, b.config]), [a, b]), {**BODY, "max_tokens": 3})
    assert not b.requests
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"]) == "Hello w"
    assert out[-1]["choices"][0]["finish_reason"] == "length" and out[-1]["qwenkit_backends"] == ["a"]
    # ... also when there is no next backend at all, and for a whole (non-streamed) completion
    a = Scripted("a", cut())
    result, served = asyncio.run(Router(RouteConfig([a.config]), [a]).complete({**BODY, "max_tokens": 2}))
    assert result["choices"][0]["finish_reason"] == "length" and served == ["a"]
    assert result["choices"][0]["message"]["content"] == "Hello w"


def test_native_backend_counts_tokens_once_loaded(tiny_model):
    b = NativeBackend(BackendConfig(name="d", type="native", model="tiny"), loader=lambda: tiny_model)
    assert b.token_counter() is None  # not loaded: the router counts chunks
    asyncio.run(b.start())
    try:
        assert b.wait_loaded(60)
        count = b.token_counter()
        assert count("Hello, world") == len(tiny_model.tokenizer.encode("Hello, world")) and count("") == 0
    finally:
        asyncio.run(b.close())


def test_a_native_backend_serves_its_adapters_by_name(tiny_hf_path, tmp_path):
    """A route's on-device model with `lora:`: a request naming the adapter gets it, any other name the base."""
    import qwenkit
    from qwenkit.route.client import Client
    from tests.unit.test_adapters import trained_adapter

    folder = trained_adapter(tiny_hf_path, tmp_path / "support", seed=9)
    config = BackendConfig(name="device", type="native", model="tiny", lora={"support": str(folder)})
    backend = NativeBackend(config, loader=lambda: qwenkit.load(tiny_hf_path, pull=False))
    messages = [{"role": "user", "content": "hello"}]
    with Client(Router(RouteConfig([config]), [backend])) as client:
        assert backend.wait_loaded(60)

        def text(**kw):
            reply = client.chat(messages, temperature=0, max_tokens=8, **kw)
            return reply["choices"][0]["message"]["content"]

        base, adapted = text(), text(model="support")
        assert adapted != base and text(model="anything-else") == base and text(model="support") == adapted


def test_a_non_streamed_answer_keeps_each_tool_call_once():
    """A backend that sends a call's name and whole arguments in one delta (qwenkit serve does) must not have its
    arguments doubled when the router folds the stream into one chat.completion."""
    from qwenkit.route.router import _Accumulator

    acc = _Accumulator()
    acc.add({"id": "c1", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Hangzhou"}'}}]}}]})
    acc.add({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_1", "type": "function", "function": {"name": "web_search", "arguments": '{"q'}}]}}]})
    acc.add({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "function": {"arguments": '": "x"}'}}]}, "finish_reason": "tool_calls"}]})
    calls = acc.result()["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", "get_weather", '{"location": "Hangzhou"}'), ("call_1", "web_search", '{"q": "x"}')]


class SSEHost:
    """A real HTTP/1.1 server on loopback that answers every chat request with the same SSE body (keep-alive,
    Content-Length), and records the client port of each request: one port means one reused connection."""

    def __init__(self, body: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.connections: set[int] = set()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                self.rfile.read(int(self.headers["Content-Length"]))
                host.connections.add(self.client_address[1])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def streams(self, n: int) -> list[list[dict]]:
        """n requests in turn through one OpenAIBackend, each stream's chunks."""
        from qwenkit.route.backends import OpenAIBackend

        backend = OpenAIBackend(BackendConfig(name="host", type="openai", base_url=self.url))

        async def go() -> list[list[dict]]:
            try:
                return [[c async for c in backend.stream(dict(BODY))] for _ in range(n)]
            finally:
                await backend.close()

        try:
            return asyncio.run(go())
        finally:
            self.server.shutdown()
            self.server.server_close()


def sse_body(*chunks: dict) -> bytes:
    import json

    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


def test_an_openai_backend_keeps_one_connection_across_requests():
    """After `data: [DONE]` the backend reads the body to its end, so its keep-alive connection is reused: a
    response left half-read is closed with its connection, and a TCP connect per request is latency on every
    routed request."""
    one = chunk("hi", finish="stop")
    host = SSEHost(sse_body(one))
    assert host.streams(3) == [[one]] * 3
    assert len(host.connections) == 1


def test_an_openai_backend_reads_long_lines_and_refuses_endless_ones():
    """A 1 MB event (one chunk of many logprobs, say) passes aiohttp's 64 KiB line buffer; a line that never
    ends is cut at 16 MiB as a backend failure, not read into memory without end."""
    big = chunk("x" * 1_000_000, finish="stop")
    assert SSEHost(sse_body(big)).streams(1) == [[big]]
    with pytest.raises(BackendError, match="over 16 MiB"):
        SSEHost(b"data: " + b"x" * (17 << 20)).streams(1)


def usage_chunk(prompt: int, completion: int) -> dict:
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def test_a_backend_that_wrote_nothing_is_not_named():
    # The host opens its stream with the role chunk, then misses its first-token deadline: every word is b's.
    a = Scripted("a", [chunk(role=True), 5.0], first_token_timeout=0.2)
    b = Scripted("b", [chunk(role=True), chunk("Hi"), chunk(finish="stop")], remote=False)
    out = run(Router(RouteConfig([a.config, b.config]), [a, b]), BODY)
    assert out[0]["qwenkit_backends"] == ["b"]  # the first chunk the client gets already names who answers
    assert out[-1]["qwenkit_backends"] == ["b"]
    assert sum(1 for c in out for ch in c["choices"] if ch["delta"].get("role")) == 1
    # over HTTP, the header is sent with the first chunk: it must name b too
    from starlette.testclient import TestClient

    from qwenkit.serve.route_app import BACKENDS_HEADER, create_route_app

    with TestClient(create_route_app(Router(RouteConfig([a.config, b.config], probe_interval=3600), [a, b]))) as c:
        r = c.post("/v1/chat/completions", json={**BODY, "stream": True})
        assert r.status_code == 200 and r.headers[BACKENDS_HEADER] == "b"


def test_usage_after_a_failover_describes_the_whole_answer():
    a = Scripted("a", [chunk(role=True), chunk("Hel"), chunk("lo"), BackendError("a", "connection lost")])
    # b was given the partial answer as prompt: 10 of the client's prompt tokens + 2 carried, and wrote 3 more
    b = Scripted("b", [chunk(role=True), chunk(", wor"), chunk("ld"), chunk("!", finish="stop"), usage_chunk(12, 3)])
    out = run(Router(RouteConfig([a.config, b.config]), [a, b]),
              {**BODY, "stream_options": {"include_usage": True}})
    assert out[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert out[-1]["qwenkit_backends"] == ["a", "b"]


def test_the_last_backend_left_is_waited_for_while_it_works():
    class Slow(Scripted):
        busy = True

        def working(self) -> bool:
            return self.busy

    script = [chunk(role=True), 0.6, chunk("slow"), 0.6, chunk(" but sure", finish="stop")]
    a = Scripted("a", [BackendError("a", "refused")])
    dev = Slow("dev", list(script), remote=False, first_token_timeout=0.2, inter_token_timeout=0.2)
    out = run(Router(RouteConfig([a.config, dev.config]), [a, dev]), BODY)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"]) == "slow but sure"
    assert out[-1]["qwenkit_backends"] == ["dev"]
    # With another backend after it, the deadline is what moves the request on.
    other = Scripted("other", [chunk("quick", finish="stop")])
    out = run(Router(RouteConfig([dev.config, other.config]), [dev, other]), BODY)
    assert out[-1]["qwenkit_backends"] == ["other"]
    # And a last backend that is not working (a stalled remote host) is still abandoned.
    dev.busy = False
    with pytest.raises(AllBackendsFailed, match="no first token within"):
        run(Router(RouteConfig([dev.config]), [dev]), BODY)


def test_an_on_device_model_slower_than_its_deadlines_still_answers(tiny_model):
    """Deadlines far below one engine step: as the only backend, the model is waited for while its engine works."""
    b = NativeBackend(BackendConfig(name="device", type="native", model="tiny", first_token_timeout=0.001,
                                    inter_token_timeout=0.001), loader=lambda: tiny_model)

    async def go():
        await b.start()
        try:
            assert b.wait_loaded(60)
            router = Router(RouteConfig([b.config]), [b])
            return [c async for c in router.stream({**BODY, "temperature": 0, "max_tokens": 24,
                                                    "messages": [{"role": "user", "content": "hello " * 60}]})]
        finally:
            await b.close()

    out = asyncio.run(go())
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"])
    expected = tiny_model.chat([{"role": "user", "content": "hello " * 60}], temperature=0, max_tokens=24).text
    assert text == expected and out[-1]["qwenkit_backends"] == ["device"]
