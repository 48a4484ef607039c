"""`qwenkit serve` as a real subprocess on loopback, with the real default model, driven by the official openai client.

One server (module-scoped, started with --api-key) serves every test: loading the model takes about a minute here,
so it is loaded once. Answers are kept short (8-24 tokens) and greedy wherever the check is exact. The last test
sends SIGTERM mid-stream, so it must stay last in the file.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.test_cli import qwenkit_command

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

KEY = "sk-test-0123456789"
NAME = "qwen-test"
MAX_MODEL_LEN = 2048
MAX_BATCH = 8
MAX_QUEUE = 64  # above the 50 clients of the disconnect test, whom the engine may not have admitted yet
LOAD_TIMEOUT = 600  # seconds: loading the real model takes ~70 s alone, more when the cores are shared
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
COUNTING = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `qwenkit serve` subprocess; its output goes to a log file (a pipe nobody reads would block it)."""

    def __init__(self, model: Path, log: Path, *args: str):
        self.port = free_port()
        self.log = log
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("QWENKIT_API_KEY", None)
        cmd = [*qwenkit_command(), "serve", str(model), "--port", str(self.port), *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
                headers: dict | None = None) -> tuple[int, dict, object]:
        """(status, headers, parsed JSON or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            h = {"Content-Type": "application/json", **(headers or {})}
            if key is not None:
                h["Authorization"] = f"Bearer {key}"
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            text = r.read().decode()
            try:
                payload: object = json.loads(text)
            except json.JSONDecodeError:
                payload = text
            return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
        finally:
            conn.close()

    def wait_ready(self, timeout: float = LOAD_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _, body = self.request("GET", "/health", key=None)
                if status == 200:
                    return
                assert status == 503 and body == {"status": "loading"}, (status, body)
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200, text
        return {m[0]: float(m[1]) for m in re.findall(r"^(qwenkit_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def wait_idle(self, timeout: float = 120) -> dict[str, float]:
        """The metrics once no request is running or waiting (aborted ones leave at the engine's next step)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["qwenkit_requests_running"] == m["qwenkit_requests_waiting"] == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    s = Server(default_gguf, tmp_path_factory.mktemp("serve") / "server.log", "--api-key", KEY,
               "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN), "--max-batch", str(MAX_BATCH),
               "--max-queue", str(MAX_QUEUE))
    yield from serving(s)


def serving(s: Server):
    """A module fixture's body: the server once ready, stopped afterwards, and no traceback in its output."""
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
    assert "Traceback" not in s.output(), s.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=300)


def greedy(client, messages=CAPITAL, max_tokens: int = 8, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=max_tokens, **kw)


def stream_text(client, **kw) -> tuple[str, list]:
    """Content of a streamed chat answer, and every chunk."""
    chunks = list(client.chat.completions.create(model=NAME, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def assert_error(status: int, body, want_status: int, *needles: str, code: str | None = None) -> dict:
    """An OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert "Traceback" not in err["message"]
    for needle in needles:
        assert needle in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------------------------- basics


def test_a_model_that_cannot_load_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    p = subprocess.run([*qwenkit_command(), "serve", str(bad), "--port", str(free_port())], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 1, p
    lines = [line for line in p.stderr.splitlines() if line.startswith("qwenkit: error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_health_needs_no_key_and_models_lists_the_served_name(server, client):
    status, _, body = server.request("GET", "/health", key=None)
    assert (status, body) == (200, {"status": "ready"})
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat(client):
    r = greedy(client)
    choice = r.choices[0]
    assert "paris" in choice.message.content.lower(), choice
    assert choice.message.role == "assistant" and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert r.model == NAME and r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 8


def test_chat_stream_equals_chat_and_ends_with_usage(client):
    whole = greedy(client)
    text, chunks = stream_text(client, messages=CAPITAL, temperature=0, max_tokens=8,
                               stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last  # usage comes alone, in the last chunk
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_tool_call_round_trip(server, client):
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = greedy(client, messages, max_tokens=24, tools=[WEATHER_TOOL],
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and "paris" in args["city"].lower(), args

    messages.append(choice.message)  # the client's own message object, echoed back as clients do
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 31, "sky": "sunny"}'})
    final = greedy(client, messages, max_tokens=16, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason in ("stop", "length")
    assert not final.choices[0].message.tool_calls and final.choices[0].message.content
    # The model saw its call and the tool's answer, in the template's own format. (What it makes of them is up to
    # the model: the 0.5B coder tends to repeat its call as text rather than answer.)
    plain = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
    status, _, tok = server.request("POST", "/tokenize", {"messages": plain, "tools": [WEATHER_TOOL]})
    assert status == 200 and tok["count"] == final.usage.prompt_tokens, tok
    prompt = server.request("POST", "/detokenize", {"tokens": tok["tokens"]})[2]["prompt"]
    sent_call = '{"name": "get_weather", "arguments": ' + json.dumps(args, ensure_ascii=False) + "}"
    assert f"<tool_call>\n{sent_call}\n</tool_call>" in prompt, prompt
    assert '<tool_response>\n{"temperature_c": 31, "sky": "sunny"}\n</tool_response>' in prompt, prompt


def test_tool_calls_stream_as_deltas(client):
    messages = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    chunks = list(client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=24, tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, stream=True,
    ))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas, chunks
    assert {d.index for d in deltas} == {0}
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert "tokyo" in args["city"].lower(), args
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_choice_none_answers_in_text(client):
    r = greedy(client, [{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=12,
               tools=[WEATHER_TOOL], tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_json_schema_output_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = greedy(client, [{"role": "user", "content": "Invent a person. Reply with their name and age."}],
               max_tokens=40, response_format={"type": "json_schema",
                                               "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_n_choices(client):
    r = client.chat.completions.create(model=NAME, messages=CAPITAL, n=2, temperature=0.8, seed=7, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 2 * 8


def test_stop_string_ends_the_answer(client):
    full = greedy(client, COUNTING, max_tokens=12).choices[0].message.content
    stop = ", 3,"
    assert stop in full, full
    r = greedy(client, COUNTING, max_tokens=12, stop=[stop, "never appears"])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("prompt", ["Write a word.", "Summarise in one word: " + "the river runs to the sea, " * 12])
def test_same_seed_same_text(server, client, prompt):
    """The second request finds its prompt in the prefix cache and computes only the last token anew; that token
    must come out exactly as in the cold prefill (in one chunk), or a seeded sample can flip."""
    from qwenkit.kernels.library import available

    if not available():
        pytest.skip("rows are computed alone only by qwenkit's CPU kernels (built with a C compiler, AVX512-VNNI)")
    kw = dict(model=NAME, messages=[{"role": "user", "content": prompt}], temperature=0.8, seed=1234, max_tokens=8,
              logprobs=True)
    first = client.chat.completions.create(**kw).choices[0]
    hits = server.metrics()["qwenkit_prefix_cache_hits_total"]
    second = client.chat.completions.create(**kw).choices[0]
    assert server.metrics()["qwenkit_prefix_cache_hits_total"] > hits
    assert first.message.content == second.message.content and first.message.content
    assert [t.logprob for t in first.logprobs.content] == [t.logprob for t in second.logprobs.content]


def test_kv_cache_keeps_float16_and_metrics_say_so(server):
    """The default model (24 layers, 2 key/value heads of 64): float16 keys and values, 12 KiB a token, half of
    what a float32 cache holds."""
    assert server.metrics()["qwenkit_kv_bytes_per_token"] == 2 * 24 * 2 * 64 * 2


def test_logprobs(client):
    # No repetition penalty (the model's default is 1.1): greedy then picks the raw distribution's top token.
    r = greedy(client, logprobs=True, top_logprobs=3, extra_body={"repetition_penalty": 1.0})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")  # no entry for EOS
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content


def test_completions(client):
    kw = dict(model=NAME, prompt="def add(a, b):\n", temperature=0, max_tokens=8)
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.choices[0].text.strip()
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == r.choices[0].text
    echoed = client.completions.create(echo=True, **kw)
    assert echoed.choices[0].text == kw["prompt"] + r.choices[0].text


def test_tokenize_detokenize_round_trip(server, client):
    text = "Hello, 世界! def f(x): return x**2"
    status, _, tok = server.request("POST", "/tokenize", {"model": NAME, "prompt": text})
    assert status == 200 and tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
    status, _, detok = server.request("POST", "/detokenize", {"model": NAME, "tokens": tok["tokens"]})
    assert (status, detok) == (200, {"prompt": text})
    # The chat form counts exactly the prompt tokens a chat request reports.
    status, _, chat = server.request("POST", "/tokenize", {"messages": CAPITAL})
    assert status == 200 and chat["count"] == greedy(client).usage.prompt_tokens


# --------------------------------------------------------------------------------------------- bad requests


def test_bad_requests_get_openai_errors(server, client):
    chat = "/v1/chat/completions"
    ok = {"model": NAME, "messages": CAPITAL, "max_tokens": 4}
    assert_error(*server.request("POST", chat, b'{"messages": [')[::2], 400, "not valid JSON")
    err = assert_error(*server.request("POST", chat, {**ok, "temperature": "hot"})[::2], 400, "temperature")
    assert err["param"] == "temperature"
    err = assert_error(*server.request("POST", chat, {**ok, "max_tokenz": 4})[::2], 400, "max_tokenz")
    assert err["param"] == "max_tokenz"
    err = assert_error(*server.request("POST", chat, {**ok, "messages": [{"role": "user", "content": "x",
                                                                          "colour": 1}]})[::2], 400, "colour")
    assert err["param"] == "messages[0].colour"
    assert_error(*server.request("POST", chat, {**ok, "temperature": -1})[::2], 400, "temperature")
    assert_error(*server.request("POST", chat, {**ok, "model": "gpt-4"})[::2], 404, "gpt-4")
    long = [{"role": "user", "content": "hello " * MAX_MODEL_LEN}]
    assert_error(*server.request("POST", chat, {**ok, "messages": long})[::2], 400,
                 code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:  # the official client sees the same code
        client.chat.completions.create(model=NAME, messages=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert_error(*server.request("POST", chat, ok, key="sk-wrong")[::2], 401, code="invalid_api_key")
    assert_error(*server.request("POST", chat, ok, key=None)[::2], 401, code="invalid_api_key")
    assert_error(*server.request("GET", "/metrics", key=None)[::2], 401)
    assert_error(*server.request("POST", chat, b"x" * (17 << 20))[::2], 413)
    assert_error(*server.request("GET", "/v1/nothing")[::2], 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0).models.list()
    # ... and the server still answers, correctly.
    assert server.request("GET", "/health", key=None)[0] == 200
    assert "paris" in greedy(client).choices[0].message.content.lower()


# --------------------------------------------------------------------------------------------- concurrency


def test_concurrent_greedy_streams_equal_alone(client):
    prompts = [f"Name a fruit that starts with the letter {chr(ord('A') + i)}." for i in range(16)]

    def ask(prompt: str) -> tuple[str, str]:
        text, chunks = stream_text(client, messages=[{"role": "user", "content": prompt}], temperature=0,
                                   max_tokens=6)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, reasons[-1]

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def finished_sequences(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("qwenkit_requests_finished_total"))


def test_disconnecting_clients_free_every_kv_block(server, client):
    # Long answers (the count to 20 takes ~60 tokens): had the requests not been aborted, they would still run.
    body = json.dumps({"model": NAME, "messages": COUNTING, "max_tokens": 200, "temperature": 0, "stream": True})
    finished = finished_sequences(server.metrics())

    def leave_early(i: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status == 200 and i % 2:  # half leave after the first answer token, half right after the headers
            line = b"-"
            while line and b'"content":"' not in line.replace(b'"content":""', b""):
                line = r.readline()
        r.close()
        conn.close()
        return r.status

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(leave_early, range(50)))
    assert set(statuses) == {200}, statuses
    m = server.wait_idle(timeout=30)
    assert m["qwenkit_requests_running"] == m["qwenkit_requests_waiting"] == 0, m
    assert m["qwenkit_kv_blocks_used"] == 0, m
    assert finished_sequences(m) == finished, "some requests ran to the end: their clients' departure went unnoticed"
    assert "paris" in greedy(client).choices[0].message.content.lower()


def test_full_queue_answers_429(server, client):
    body = json.dumps({"model": NAME, "messages": CAPITAL, "max_tokens": 4, "stream": True})
    count = MAX_QUEUE + MAX_BATCH + 24
    barrier = threading.Barrier(count)

    def ask(_: int) -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        conn.connect()
        barrier.wait()  # everyone at once, so the queue is full when the last ones arrive
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        payload = r.read() if r.status != 200 else b""
        r.close()
        conn.close()  # admitted ones leave at once: this test is about admission
        return r.status, r.getheader("Retry-After"), payload

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(ask, range(count)))
    rejected = [(h, p) for s, h, p in results if s == 429]
    assert rejected, [s for s, _, _ in results]
    assert {s for s, _, _ in results} <= {200, 429}
    for retry_after, payload in rejected:
        assert retry_after and int(retry_after) >= 1
        assert_error(429, json.loads(payload), 429, "queue", code="rate_limit_exceeded")
    m = server.wait_idle()  # as a client honouring Retry-After would, come back once the burst has drained
    assert m["qwenkit_requests_running"] == m["qwenkit_requests_waiting"] == 0, m
    assert "paris" in greedy(client).choices[0].message.content.lower()


# --------------------------------------------------------------------------------------------- keep last


def test_sigterm_lets_the_stream_finish(server, client):
    stream = client.chat.completions.create(model=NAME, messages=COUNTING, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = []
    for chunk in stream:  # up to the first answer token: the request is running
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            break
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:  # draining: new connections are refused, or told 503 in the moment before the socket closes
        assert server.request("GET", "/health", key=None)[0] == 503
    except OSError:
        pass
    chunks += list(stream)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"], chunks
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert server.proc.wait(timeout=120) == 0, server.output()
    assert "Traceback" not in server.output()
