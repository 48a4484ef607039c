"""The hybrid router with real processes on loopback: a hosted `qwenkit serve` subprocess (a tiny random model) in
front of an on-device fallback (another tiny model with different weights, so a continuation cannot pass by
accident). The host is killed, frozen and faked into 500/429; every request must complete through the fallback,
mid-stream with no text lost or repeated; after a restart, requests return to the host within a probe interval.

The router runs in-process through qwenkit.Client (the embedding API), and once as `qwenkit serve --route`.
Answers are greedy so every expectation is exact.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_cli import qwenkit_command
from tests.e2e.test_serve import free_port
from tests.fakes.loopback import serving
from tests.tiny_checkpoint import tiny_hf_folder

pytestmark = [pytest.mark.slow]

PROBE = 0.5  # seconds between health probes: recovery must take at most about this long
HELLO = [{"role": "user", "content": "hello"}]
HOST_NAME = "host-model"


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class Proc:
    """A qwenkit subprocess on a fixed port (so a restarted host is found at the same address)."""

    def __init__(self, args: list[str], log: Path, port: int):
        self.args, self.log, self.port = args, log, port
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("QWENKIT_API_KEY", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*qwenkit_command(), "serve", *self.args, "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while get(f"http://127.0.0.1:{self.port}/health") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.2)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> tuple[Path, Path]:
    """(host model, device model): tiny Qwen2 folders with different seeds (seed 3 writes plenty of text)."""
    root = tmp_path_factory.mktemp("route")
    return tiny_hf_folder(root / "host", seed=3), tiny_hf_folder(root / "device", seed=2)


@pytest.fixture(scope="module")
def host(paths, tmp_path_factory):
    h = Proc([str(paths[0]), "--served-model-name", HOST_NAME], tmp_path_factory.mktemp("logs") / "host.log",
             free_port()).start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def device_model(paths):
    """The fallback's weights loaded on their own, to compute what the router's fallback must produce."""
    import qwenkit

    return qwenkit.load(paths[1], pull=False)


def route_yaml(host_url: str, device: Path, **host_opts) -> str:
    opts = {"first_token_timeout": 3, "inter_token_timeout": 2, "connect_timeout": 1,
            "breaker": "{failures: 1, cooldown: 60}", **host_opts}
    lines = "".join(f"    {k}: {v}\n" for k, v in opts.items())
    return (f"probe_interval: {PROBE}\nbackends:\n  - name: host\n    type: openai\n    base_url: {host_url}\n"
            f"    model: {HOST_NAME}\n{lines}  - name: device\n    type: native\n    model: {device}\n")


@pytest.fixture(scope="module")
def client(host, paths):
    import qwenkit
    from qwenkit.route import parse_route

    c = qwenkit.Client(parse_route(route_yaml(f"http://127.0.0.1:{host.port}", paths[1])))
    assert c.router.backend("device").wait_loaded(60)
    yield c
    c.close()


def healthy(host: Proc, client) -> None:
    """Every test starts with the host up and its breaker closed."""
    if not host.alive:
        host.start()
    client.probe()
    assert client.router.backend("host").breaker.state == "closed"


def stream(client, **body) -> tuple[list[str], list[str]]:
    """(content pieces, backends) of a streamed greedy answer."""
    pieces, backends = [], None
    for chunk in client.chat(HELLO, stream=True, temperature=0, **body):
        for c in chunk["choices"]:
            if c["delta"].get("content"):
                pieces.append(c["delta"]["content"])
        backends = chunk.get("qwenkit_backends", backends)
    return pieces, backends


def answer(model, messages, max_tokens: int, **kw) -> str:
    return model.chat(messages, temperature=0, max_tokens=max_tokens, **kw).text


def test_healthy_path_is_the_host(host, client, device_model):
    healthy(host, client)
    reply = client.chat(HELLO, temperature=0, max_tokens=16)
    assert reply["qwenkit_backends"] == ["host"]
    assert reply["choices"][0]["message"]["content"] != answer(device_model, HELLO, 16)  # the weights differ


def test_host_killed_before_request_then_recovers(host, client, device_model):
    healthy(host, client)
    host.kill()
    pieces, backends = stream(client, max_tokens=16)
    assert backends == ["device"]
    assert "".join(pieces) == answer(device_model, HELLO, 16)
    # The breaker is open now (failures: 1): the next request goes straight to the device, no connect attempt.
    assert client.router.backend("host").breaker.state == "open"
    started = time.monotonic()
    reply = client.chat(HELLO, temperature=0, max_tokens=1)
    assert reply["qwenkit_backends"] == ["device"]
    assert time.monotonic() - started < 2.0  # one tiny decode step; no timeout was waited on
    # Recovery: once the host is back, the background probe closes the breaker within one probe interval.
    host.start()
    up = time.monotonic()
    breaker = client.router.backend("host").breaker
    while breaker.state != "closed" and time.monotonic() - up < 10:
        time.sleep(0.02)
    assert time.monotonic() - up < PROBE + 0.3  # one probe interval (plus the probe's own round trip)
    assert client.chat(HELLO, temperature=0, max_tokens=4)["qwenkit_backends"] == ["host"]


def test_host_killed_mid_stream_continues_on_device(host, client, device_model):
    healthy(host, client)
    max_tokens, kill_after = 80, 3
    pieces, backends = [], None
    for chunk in client.chat(HELLO, stream=True, temperature=0, max_tokens=max_tokens):
        for c in chunk["choices"]:
            if c["delta"].get("content"):
                pieces.append(c["delta"]["content"])
                if len(pieces) == kill_after:
                    host.kill()
        backends = chunk.get("qwenkit_backends", backends)
    assert backends == ["host", "device"], backends
    received = "".join(pieces)
    # The host may have delivered a few more chunks than we had read when it died: the switch is at one of the
    # chunk boundaries from `kill_after` on. At exactly one of them, the rest must be the device's own greedy
    # continuation of that prefix (no text lost, none repeated), within what the prefix left of max_tokens (the
    # router counts the prefix with the device's tokenizer, at least one token per chunk).
    matches = []
    for k in range(kill_after, len(pieces)):
        prefix = "".join(pieces[:k])
        left = max_tokens - max(k, len(device_model.tokenizer.encode(prefix)))
        cont = answer(device_model, [*HELLO, {"role": "assistant", "content": prefix}], left,
                      add_generation_prompt=False, continue_final_message=True)
        if cont and received == prefix + cont:
            matches.append(k)
            break
    assert matches, f"no split of {received!r} is host prefix + device continuation"


def test_frozen_host_times_out_to_device(host, client, device_model):
    healthy(host, client)
    host.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        pieces, backends = stream(client, max_tokens=8)
        waited = time.monotonic() - started
    finally:
        host.proc.send_signal(signal.SIGCONT)
    assert backends == ["device"]
    assert "".join(pieces) == answer(device_model, HELLO, 8)
    assert 2.5 < waited < 30  # the first-token timeout (3 s) was waited once, not forever


class _Fake(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible host that only ever answers with an error status."""

    status = 500
    hits = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"error": {"message": "fake", "type": "server_error"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status", [500, 429])
def test_error_status_fails_over_after_retries(status, paths, device_model):
    import qwenkit
    from qwenkit.route import parse_route

    handler = type("Fake", (_Fake,), {"status": status, "hits": 0})
    with serving(handler) as url:
        cfg = parse_route(route_yaml(url, paths[1], retries=1, backoff=0.05, breaker="{failures: 5, cooldown: 60}"))
        cfg.probe_interval = 3600  # this test counts the fake host's hits: no probes
        with qwenkit.Client(cfg) as c:
            assert c.router.backend("device").wait_loaded(60)
            reply = c.chat(HELLO, temperature=0, max_tokens=8)
    assert reply["qwenkit_backends"] == ["device"]
    assert reply["choices"][0]["message"]["content"] == answer(device_model, HELLO, 8)
    assert handler.hits == 2  # one try and one retry, then the next backend



class _Streamer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible host whose /health answers 200 and whose chat stream sends the role chunk, then the
    pieces in `texts`, then either hangs (`hang`) or drops the connection with no finish reason."""

    texts: tuple[str, ...] = ()
    hang = True

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.stream_texts()

    def stream_texts(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        deltas = [{"role": "assistant", "content": ""}, *({"content": t} for t in self.texts)]
        for delta in deltas:
            event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": HOST_NAME,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        if self.hang:
            time.sleep(30)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


def fake_host(texts: list[str], hang: bool):
    return serving(type("Host", (_Streamer,), {"texts": tuple(texts), "hang": hang}))


def test_a_healthy_looking_host_that_hangs_is_taken_out(paths, device_model):
    """/health answers, completions hang after the role chunk: probes must not keep the breaker closed, and the
    device, which wrote every word, is the only backend named."""
    import qwenkit
    from qwenkit.route import parse_route

    with fake_host([], hang=True) as url:
        cfg = parse_route(route_yaml(url, paths[1], first_token_timeout=1, retries=1,
                                     breaker="{failures: 3, cooldown: 600}"))
        cfg.probe_interval = 0.2  # several good probes during every wait
        with qwenkit.Client(cfg) as c:
            assert c.router.backend("device").wait_loaded(60)
            expected = answer(device_model, HELLO, 4)
            for _ in range(2):  # two tries each (retries: 1): the third failure opens the breaker
                pieces, backends = stream(c, max_tokens=4)
                assert backends == ["device"] and "".join(pieces) == expected
            assert c.router.backend("host").breaker.state == "open"
            time.sleep(0.5)  # probes keep answering 200 meanwhile
            started = time.monotonic()
            assert stream(c, max_tokens=4)[1] == ["device"]
            assert time.monotonic() - started < 0.9  # offline mode: no first-token timeout waited


def test_usage_after_a_mid_stream_failover_counts_the_whole_answer(paths, device_model):
    import qwenkit
    from qwenkit.route import parse_route

    word = next(w for w in (" the", " a", " to", " and", "the", "a") if len(device_model.tokenizer.encode(w)) == 1)
    with fake_host([word] * 16, hang=False) as url:  # 16 one-token pieces, then the connection drops
        cfg = parse_route(route_yaml(url, paths[1]))
        cfg.probe_interval = 3600
        with qwenkit.Client(cfg) as c:
            assert c.router.backend("device").wait_loaded(60)
            chunks = list(c.chat(HELLO, stream=True, temperature=0, max_tokens=32,
                                 stream_options={"include_usage": True}))
    assert chunks[-1]["qwenkit_backends"] == ["host", "device"]
    usage = next(ch["usage"] for ch in chunks if ch.get("usage"))
    text = "".join(c["delta"].get("content", "") for ch in chunks for c in ch["choices"])
    # What the device wrote: its greedy continuation of the 16 pieces, with the 16 left of max_tokens.
    cont = device_model.chat([*HELLO, {"role": "assistant", "content": word * 16}], temperature=0, max_tokens=16,
                             add_generation_prompt=False, continue_final_message=True)
    assert text == word * 16 + cont.text
    alone = device_model.chat(HELLO, temperature=0, max_tokens=1)
    assert usage["prompt_tokens"] == alone.usage.prompt_tokens  # the client's prompt, not prompt + partial answer
    assert usage["completion_tokens"] == 16 + cont.usage.completion_tokens  # both backends' tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

def test_serve_route_subprocess(host, client, paths, tmp_path):
    """`qwenkit serve --route`: the same API over HTTP, with the header and the last chunk's field."""
    openai = pytest.importorskip("openai")
    healthy(host, client)
    route = tmp_path / "route.yaml"
    route.write_text(route_yaml(f"http://127.0.0.1:{host.port}", paths[1]))
    router = Proc(["--route", str(route)], tmp_path / "router.log", free_port()).start()
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{router.port}/v1", api_key="none", max_retries=0)
        raw = api.chat.completions.with_raw_response.create(model="any", messages=HELLO, temperature=0, max_tokens=8,
                                                            stream=True)
        assert raw.headers["x-qwenkit-backends"] == "host"
        chunks = list(raw.parse())
        assert (chunks[-1].model_extra or {}).get("qwenkit_backends") == ["host"]
        host.kill()
        reply = api.chat.completions.create(model="any", messages=HELLO, temperature=0, max_tokens=8)
        assert (reply.model_extra or {}).get("qwenkit_backends") == ["device"]
        assert reply.choices[0].message.content
    finally:
        router.stop()


PHOTO_URL = "data:image/jpeg;base64," + base64.b64encode(
    (Path(__file__).parents[1] / "fixtures" / "images" / "chelsea_exif6.jpg").read_bytes()).decode()
WITH_IMAGE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}},
                                           {"type": "text", "text": "What is this?"}]}]


class _Recorder(_Streamer):
    """A host that answers every chat with "A cat." and keeps each request body it got (in `bodies`, a list each
    subclass is given)."""

    bodies: list
    texts = ("A cat.",)
    hang = False

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
        self.stream_texts()
        self.wfile.write(b'data: {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", '
                         b'"choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]}\n\n'
                         b"data: [DONE]\n\n")


def test_images_pass_through_to_the_host_and_a_text_only_device_refuses_them(paths, device_model):
    """A hosted vision model gets the image parts exactly as the client sent them. When the host is down and the
    on-device fallback takes text only, the client gets a clear refusal naming that backend, never an answer made up
    without the image; unless the route file says `images: drop`, and then the device answers the text."""
    import qwenkit
    from qwenkit.route import parse_route

    handler = type("Host", (_Recorder,), {"bodies": []})
    with serving(handler) as url:
        cfg = parse_route(route_yaml(url, paths[1]))
        cfg.probe_interval = 3600
        c = qwenkit.Client(cfg)
        assert c.router.backend("device").wait_loaded(60)
        reply = c.chat(WITH_IMAGE, temperature=0, max_tokens=8)
        assert reply["choices"][0]["message"]["content"] == "A cat." and reply["qwenkit_backends"] == ["host"]
        assert handler.bodies[-1]["messages"] == WITH_IMAGE
    with c:  # the host is gone now
        with pytest.raises(Exception) as refused:
            c.chat(WITH_IMAGE, temperature=0, max_tokens=8)
        c.router.backend("device").config.images = "drop"
        dropped = c.chat(WITH_IMAGE, temperature=0, max_tokens=8)
    assert "device" in str(refused.value) and "takes text only" in str(refused.value)
    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]
    assert dropped["qwenkit_backends"] == ["device"]
    assert dropped["choices"][0]["message"]["content"] == answer(device_model, text_only, 8)
