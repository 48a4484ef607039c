#!/usr/bin/env python
"""What the hybrid router costs: `qwenkit serve --route` against calling the same servers directly, on loopback.

    python benchmarks/route.py                                 # the tiny random model, 30 requests per path
    python benchmarks/route.py --model qwen2.5-coder:0.5b      # the default real model (three loads: minutes)
    python benchmarks/route.py --requests 6 --max-tokens 4     # smoke test

Real processes: a hosted `qwenkit serve MODEL` subprocess, a router subprocess (`qwenkit serve --route`) whose first
backend is that host and whose fallback is the same model on-device (`type: native`, in the router's process), and
later a second `qwenkit serve MODEL` standing for "the on-device model called directly".

The model is by default the random tiny Qwen2 checkpoint of the tests (tests/tiny_checkpoint.tiny_hf_folder, seed 3,
written to a temporary folder): what is measured is the router's own cost, which does not depend on the model, and a
fast model keeps decode jitter from hiding a few milliseconds. The real default model (`--model qwen2.5-coder:0.5b`,
Q4_K_M, through `qwenkit.hub.pull`) gives realistic absolute times, but each of its three loads took about 90 s on
the 2-core development machine, too long for a quick run there.

Every request is the same short chat question, streamed, greedy, --max-tokens tokens, sent with a plain keep-alive
HTTP connection per server (http.client: the client's own cost is the same on both paths). Time to first token =
request sent -> first chunk with content; total = request sent -> `data: [DONE]`.

(a) Healthy path: --requests requests to the host directly and --requests through the router, alternating
    (direct, routed, direct, ...); reported: both medians and the router's added ms (routed median - direct median,
    and the median of the paired differences). Target: under 2 ms.
(b) Breaker open: the host is SIGKILLed and the router's breaker for it opened by failed requests (its probes are
    off, probe_interval 3600, so that only requests move it); then --requests requests to the router (answered by
    its native backend without trying the host) alternate with requests to a `qwenkit serve` of the same model, i.e.
    the on-device model called directly. Added ms as in (a). Target: under 50 ms.
(c) Failover cost: the first requests right after the host is SIGKILLed, while the breaker is still closed
    (failures: --breaker-failures): the router tries the host (connection refused at once on loopback) and fails
    over to the native backend. Reported: the first request's time to first token and the median of those
    --breaker-failures requests, against the direct on-device median from (b).

The router, the host and the client share the machine's cores (on two cores, the router's Python competes with the
host's decoding), which a real deployment (router and host on different machines) would not. JSON goes to
benchmarks/results/route-<date>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, write_result  # noqa: E402

DEFAULT_MODEL = "qwen2.5-coder:0.5b"
QUESTION = [{"role": "user", "content": "Write a Python one-liner that reverses a string."}]


def health(port: int) -> tuple[int, dict]:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        r = conn.getresponse()
        body = r.read()
        conn.close()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, {}
    except OSError:
        return 0, {}


def start(args: list[str], port: int, log: Path, loaded=lambda status, body: status == 200) -> subprocess.Popen:
    """`qwenkit serve ARGS --port PORT`, once `loaded(status, /health body)` holds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qwenkit", "serve", *args, "--port", str(port)], cwd=str(ROOT),
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"qwenkit serve {' '.join(args)} exited ({proc.returncode}):\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            if loaded(*health(port)):
                return proc
            time.sleep(0.2)
        raise RuntimeError(f"qwenkit serve {' '.join(args)} did not become ready in 600 s")
    except BaseException:  # not ready (or interrupted while loading): the caller never gets it to stop
        stop(proc)
        raise


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


class Target:
    """One server, one keep-alive connection: streamed greedy chat requests, timed."""

    def __init__(self, port: int, model: str, max_tokens: int):
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.conn: http.client.HTTPConnection | None = None

    def request(self) -> dict:
        body = json.dumps({"model": self.model, "messages": QUESTION, "temperature": 0,
                           "max_tokens": self.max_tokens, "stream": True}).encode()
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.conn.connect()
        sent = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"port {self.port}: HTTP {r.status}: {r.read()[:500]!r}")
        first, text, backends = None, [], None
        while True:
            line = r.readline()
            if not line:
                raise RuntimeError(f"port {self.port}: the stream ended before [DONE]")
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"port {self.port}: {chunk['error']}")
            for c in chunk.get("choices") or []:
                if c.get("delta", {}).get("content"):
                    first = first or time.perf_counter()
                    text.append(c["delta"]["content"])
            backends = chunk.get("qwenkit_backends", backends)
        done = time.perf_counter()
        r.read()
        return {"ttft_ms": ((first or done) - sent) * 1e3, "total_ms": (done - sent) * 1e3, "text": "".join(text),
                "backends": backends}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def alternate(direct: Target, routed: Target, n: int, served_by: str) -> dict:
    """n requests to each, alternating (the order flipped every pair), after one warm-up each."""
    direct.request(), routed.request()
    pairs = []
    for i in range(n):
        order = (direct, routed) if i % 2 == 0 else (routed, direct)
        got = {id(t): t.request() for t in order}
        d, r = got[id(direct)], got[id(routed)]
        if r["backends"] != [served_by]:
            raise RuntimeError(f"a routed request was served by {r['backends']}, expected [{served_by!r}]")
        pairs.append((d, r))
    out = {"requests_per_path": n}
    for key in ("ttft_ms", "total_ms"):
        ds, rs = [d[key] for d, _ in pairs], [r[key] for _, r in pairs]
        out[key] = {"direct_median": statistics.median(ds), "routed_median": statistics.median(rs),
                    "added_median": statistics.median(rs) - statistics.median(ds),
                    "added_paired_median": statistics.median(r - d for d, r in zip(ds, rs)),
                    "direct": ds, "routed": rs}
    out["same_text"] = all(d["text"] == r["text"] for d, r in pairs)
    return out


def route_yaml(host_port: int, host_model: str, device_model: str, threads: int, failures: int) -> str:
    return f"""\
probe_interval: 3600   # no probes: only requests move the breaker (deterministic phases)
served_model_name: bench
backends:
  - name: host
    type: openai
    base_url: http://127.0.0.1:{host_port}
    model: {host_model}
    connect_timeout: 1
    first_token_timeout: 60
    inter_token_timeout: 30
    breaker: {{failures: {failures}, cooldown: 3600}}
  - name: device
    type: native
    model: {json.dumps(device_model)}
    threads: {threads}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"short name, hub id or path (e.g. {DEFAULT_MODEL}); default: the tiny random test model")
    p.add_argument("--requests", type=int, default=30, help="requests per path in (a) and (b)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--breaker-failures", type=int, default=3, help="(c)'s requests: failures that open the breaker")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="qwenkit-route-bench-"))
    if args.model is None:
        from tests.tiny_checkpoint import tiny_hf_folder

        model_path, description = tiny_hf_folder(tmp / "tiny", seed=3), "tiny random Qwen2 (tests/tiny_checkpoint)"
    else:
        from qwenkit.hub import pull

        model_path, description = pull(args.model), args.model
    serve_args = [str(model_path), "--served-model-name", "model", "--threads", str(args.threads)]
    host_port, router_port, device_port = free_port(), free_port(), free_port()
    route = tmp / "route.yaml"
    route.write_text(route_yaml(host_port, "model", str(model_path), args.threads, args.breaker_failures))
    print(f"model: {description} ({model_path}); logs in {tmp}")

    def router_loaded(status: int, body: dict) -> bool:  # the native backend too, not just the HTTP side
        return status == 200 and body.get("backends", {}).get("device") == "closed"

    host = router = device = None
    targets: list[Target] = []
    try:
        started = time.monotonic()
        host = start(serve_args, host_port, tmp / "host.log")
        router = start(["--route", str(route)], router_port, tmp / "router.log", router_loaded)
        load_s = time.monotonic() - started
        print(f"host and router (with its native backend) up in {load_s:.1f} s")
        direct, routed = Target(host_port, "model", args.max_tokens), Target(router_port, "bench", args.max_tokens)
        targets += [direct, routed]

        print(f"(a) healthy path: {args.requests} requests each, direct to the host / through the router")
        healthy = alternate(direct, routed, args.requests, "host")

        print("(c) SIGKILL the host; requests right after it, breaker still closed")
        direct.close()
        host.send_signal(signal.SIGKILL)
        host.wait(30)
        failover = []
        for _ in range(args.breaker_failures):
            r = routed.request()
            if r["backends"] != ["device"]:
                raise RuntimeError(f"after the kill, a request was served by {r['backends']}")
            failover.append(r)
        state = health(router_port)[1].get("backends", {}).get("host")
        if state != "open":
            raise RuntimeError(f"the host's breaker is {state!r} after {args.breaker_failures} failures, not open")

        print(f"(b) breaker open: {args.requests} requests each, on-device model directly / through the router")
        device = start(serve_args, device_port, tmp / "device.log")
        on_device = Target(device_port, "model", args.max_tokens)
        targets.append(on_device)
        offline = alternate(on_device, routed, args.requests, "device")
    finally:
        for t in targets:
            t.close()
        for proc in (router, device, host):
            stop(proc)

    direct_ttft = offline["ttft_ms"]["direct_median"]
    result = {
        "model": description, "model_path": str(model_path), "max_tokens": args.max_tokens, "threads": args.threads,
        "cpus": os.cpu_count(), "load_s": load_s,
        "healthy": healthy, "breaker_open": offline,
        "failover_after_kill": {
            "requests": len(failover), "ttft_ms": [r["ttft_ms"] for r in failover],
            "total_ms": [r["total_ms"] for r in failover], "first_ttft_ms": failover[0]["ttft_ms"],
            "ttft_median_ms": statistics.median(r["ttft_ms"] for r in failover),
            "direct_on_device_ttft_median_ms": direct_ttft,
            "added_first_ms": failover[0]["ttft_ms"] - direct_ttft,
        },
        "targets_ms": {"healthy_added": 2.0, "breaker_open_added": 50.0},
    }
    print_table(result)
    write_result(result, "route", args.out)
    return 0


def print_table(r: dict) -> None:
    print(f"\n{r['model']}, {r['max_tokens']} tokens per answer, {r['threads']} threads, {r['cpus']} CPUs")
    print(f"{'':34}{'direct':>10}{'routed':>10}{'added':>10}{'paired':>10}{'target':>9}")
    for name, key, target in (("(a) healthy", "healthy", r["targets_ms"]["healthy_added"]),
                              ("(b) breaker open", "breaker_open", r["targets_ms"]["breaker_open_added"])):
        for metric in ("ttft_ms", "total_ms"):
            x = r[key][metric]
            label = f"{name}, {'first token' if metric == 'ttft_ms' else 'total'} (ms)"
            print(f"{label:34}{x['direct_median']:10.1f}{x['routed_median']:10.1f}{x['added_median']:+10.1f}"
                  f"{x['added_paired_median']:+10.1f}{'< ' + str(target):>9}")
    f = r["failover_after_kill"]
    print(f"{'(c) after SIGKILL, first token (ms)':34}{f['direct_on_device_ttft_median_ms']:10.1f}"
          f"{f['first_ttft_ms']:10.1f}{f['added_first_ms']:+10.1f}"
          f"   (median of {f['requests']} before the breaker opened: {f['ttft_median_ms']:.1f})")
    print("direct = the same server called without the router (the host in (a), a `qwenkit serve` of the on-device "
          "model in (b) and (c)); added = routed median - direct median; paired = median of per-pair differences")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `timeout` or Ctrl-C: unwind through main's finally, which stops the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
