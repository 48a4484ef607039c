#!/usr/bin/env python
"""Serving throughput: N concurrent streaming clients against `qwenkit serve`, over loopback, with the official
`openai` client, against the same requests sent one at a time; and llama.cpp's batched decode on the same file.
First, one stream through each entry point: `qwenkit serve` (HTTP, the `openai` client), `qwenkit run` and the
Python API, the same question, greedy, side by side (all three run on the same engine).

    python benchmarks/serve.py                          # the default model, 8 concurrent streams, 64 tokens each
    python benchmarks/serve.py --workload q8_0 --concurrency 8 --max-tokens 64
    python benchmarks/serve.py --concurrency 2 --max-tokens 8 --no-llama     # smoke test

Each request is a different chat question (greedy), so prompts differ but share the template's system prompt.
Reported: aggregate completion tokens/s (all tokens / wall time from the first request to the last answer), time to
first token p50 / p99 (request sent -> first streamed token), per-stream decode speed (tokens after the first / time
from the first to the last), and the ratio concurrent / one-at-a-time aggregate. llama.cpp (llama-cpp-python, when
installed; `make llama-cpp`) runs in its own process after the server has stopped: the same number of sequences
decoded together with one `llama_decode` per step (its batched API, greedy), reporting the decode tok/s of the
batch. Workloads are those of benchmarks/cpu.py (real, q8_0, q4_0 or a .gguf path). JSON goes to
benchmarks/results/serve-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, write_result  # noqa: E402
from benchmarks.cpu import LLAMA_MISSING, ensure_workload  # noqa: E402

QUESTIONS = [
    "Explain how a hash map works, step by step.",
    "Write a Python function that merges two sorted lists, and explain it.",
    "Describe the differences between TCP and UDP in detail.",
    "How does garbage collection work in Python?",
    "Explain recursion to a beginner with an example in Python.",
    "What is a binary search tree? Show insertion in Python.",
    "Explain what a REST API is and give an example request.",
    "Describe how to reverse a linked list, with code.",
    "What are Python decorators? Give two examples.",
    "Explain big-O notation with three examples.",
    "How does HTTPS keep data private? Explain the handshake.",
    "Write a function that checks whether a string is a palindrome, and test it.",
    "Explain the difference between a process and a thread.",
    "What is dynamic programming? Solve Fibonacci with it.",
    "How do database indexes speed up queries?",
    "Explain list comprehensions in Python with examples.",
]


def start_server(model: str, args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenkit", "serve", model, "--port", str(port), "--max-batch",
           str(max(args.concurrency, 1)), "--quant", args.quant, "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import urllib.request

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready in 900 s")


def served_model(port: int) -> str:
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none").models.list().data[0].id


async def one_stream(client, model: str, question: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    times, usage = [], None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    async for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and (delta.content or getattr(delta, "reasoning_content", None)):
            times.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else len(times)
    first, last = (times[0], times[-1]) if times else (sent, sent)
    return {"ttft_s": first - sent, "tokens": tokens, "decode_tps": (tokens - 1) / (last - first) if last > first else None,
            "done": time.perf_counter()}


async def run_phase(port: int, model: str, questions: list[str], max_tokens: int, concurrent: bool) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    started = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one_stream(client, model, q, max_tokens) for q in questions))
    else:
        results = [await one_stream(client, model, q, max_tokens) for q in questions]
    wall = max(r["done"] for r in results) - started
    await client.close()
    ttfts = sorted(r["ttft_s"] for r in results)
    speeds = [r["decode_tps"] for r in results if r["decode_tps"]]
    total = sum(r["tokens"] for r in results)
    return {"requests": len(results), "completion_tokens": total, "wall_s": wall, "aggregate_tps": total / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "per_stream_tps_median": statistics.median(speeds) if speeds else None}


STATS = re.compile(r"answer (\d+) tokens at ([\d.]+) tok/s")


def one_stream_through_the_server(port: int, model: str, args) -> dict:
    """Decode tok/s of one greedy stream through the server (client-side chunk times), --single-reps times; `qwenkit
    run` (its statistics line) and the Python API (Response.generation_tps) follow once the server has stopped."""
    question = QUESTIONS[0]
    served = [asyncio.run(run_phase(port, model, [question], args.max_tokens, False))["per_stream_tps_median"]
              for _ in range(args.single_reps)]
    return {"question": question, "serve": served}


def one_stream_outside_the_server(path: str, args) -> dict:
    """`qwenkit run` and the Python API, each in processes of their own (the server has stopped)."""
    question, run, tokens = QUESTIONS[0], [], []
    for _ in range(args.single_reps):
        cmd = [sys.executable, "-m", "qwenkit", "run", path, question, "--temperature", "0", "--max-tokens",
               str(args.max_tokens), "--threads", str(args.threads), "--quant", args.quant]
        done = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
        found = STATS.search(done.stderr)
        if done.returncode or not found:
            raise RuntimeError(f"qwenkit run failed: {done.stderr[-1000:]}")
        tokens.append(int(found.group(1)))
        run.append(float(found.group(2)))
    cmd = [sys.executable, __file__, "--_api", path, question, str(args.max_tokens), str(args.threads), args.quant,
           str(args.single_reps)]
    done = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"Python API run failed: {done.stderr[-1000:]}")
    return {"run": run, "run_tokens": tokens, "api": json.loads(done.stdout.strip().splitlines()[-1])}


def python_api(path: str, question: str, max_tokens: int, threads: int, quant: str, reps: int) -> list[float]:
    """qwenkit.load(path).chat(...) decode tok/s, after one warm-up call (run with --_api in its own process)."""
    import qwenkit

    model = qwenkit.load(path, threads=threads, quant=quant)
    messages = [{"role": "user", "content": question}]
    model.chat(messages, temperature=0, max_tokens=4)
    return [model.chat(messages, temperature=0, max_tokens=max_tokens).generation_tps for _ in range(reps)]


def percentile(sorted_values: list[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def llama_batched(path: str, batch: int, prompt_len: int, gen: int, threads: int) -> dict:
    """llama.cpp decoding `batch` sequences together: prefill each (random plain tokens), then `gen` steps that
    each decode one token of every sequence in one llama_decode call. Run with --_llama in its own process."""
    import ctypes
    import random

    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = batch * (prompt_len + gen + 8)
    params.n_batch = params.n_ubatch = max(512, batch)
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    rng = random.Random(0)
    b = llama_cpp.llama_batch_init(max(512, batch), 0, batch)

    def submit(entries):  # entries: (token, pos, seq, wants_logits)
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(out)
            b.seq_id[i][0] = seq
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    last = []
    for seq in range(batch):
        prompt = [rng.randrange(1000, 100000) for _ in range(prompt_len)]
        submit([(t, p, seq, p == prompt_len - 1) for p, t in enumerate(prompt)])
        last.append(argmax(prompt_len - 1))
    started = time.perf_counter()
    for step in range(gen):
        submit([(last[s], prompt_len + step, s, True) for s in range(batch)])
        last = [argmax(s) for s in range(batch)]
    elapsed = time.perf_counter() - started
    llama_cpp.llama_batch_free(b)
    del ctypes
    return {"batch": batch, "decode_tps": batch * gen / elapsed, "steps": gen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="real", help="real, q8_0, q4_0 or a .gguf path (see benchmarks/cpu.py)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quant", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp's batched decode")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--single-reps", type=int, default=3, help="repetitions of the one-stream comparison")
    p.add_argument("--_llama", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--_api", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._api:
        path, question, max_tokens, threads, quant, reps = args._api
        print(json.dumps(python_api(path, question, int(max_tokens), int(threads), quant, int(reps))))
        return 0
    if args._llama:
        path, batch, prompt_len, gen, threads = args._llama
        print(json.dumps(llama_batched(path, int(batch), int(prompt_len), int(gen), int(threads))))
        return 0

    path, description = ensure_workload(args.workload, args.seed, print)
    questions = (QUESTIONS * (args.concurrency // len(QUESTIONS) + 1))[: args.concurrency]
    port = free_port()
    print(f"serving {description} ({path.name}) on port {port}, {args.threads} threads, quant {args.quant}")
    server = start_server(str(path), args, port)
    try:
        model = served_model(port)
        asyncio.run(run_phase(port, model, questions[:1], 4, False))  # warm-up, not counted
        single = one_stream_through_the_server(port, model, args)
        alone = asyncio.run(run_phase(port, model, questions, args.max_tokens, False))
        together = asyncio.run(run_phase(port, model, questions, args.max_tokens, True))
        metrics = kv_metrics(port)
    finally:
        server.terminate()
        server.wait(timeout=60)
    single |= one_stream_outside_the_server(str(path), args)
    result = {"workload": args.workload, "model": description, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "threads": args.threads, "quant": args.quant,
              "one_stream": single | {"medians": {name: statistics.median(single[name]) for name in
                                                  ("serve", "run", "api")}},
              "one_at_a_time": alone, "concurrent": together, "kv_metrics": metrics,
              "concurrent_over_alone": together["aggregate_tps"] / alone["aggregate_tps"]}
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401

            cmd = [sys.executable, __file__, "--_llama", str(path), str(args.concurrency), "64",
                   str(args.max_tokens), str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            result["llama_cpp_batched"] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 \
                else {"error": done.stderr[-1000:]}
        except ImportError:
            result["llama_cpp_batched"] = {"error": LLAMA_MISSING}
    print_table(result)
    write_result(result, "serve", args.out)
    return 0


def kv_metrics(port: int) -> dict:
    """The KV cache figures /metrics reports (bytes per token, blocks in use and in all)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("qwenkit_kv_"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def print_table(r: dict) -> None:
    one = r["one_stream"]["medians"]
    print(f"\none stream, decode tok/s (median of {len(r['one_stream']['serve'])}): serve {one['serve']:.1f}, "
          f"run {one['run']:.1f}, Python API {one['api']:.1f}; slowest / fastest "
          f"{min(one.values()) / max(one.values()):.2f}")
    print(f"KV cache: {r['kv_metrics']}")
    print(f"\n{'':22}{'aggregate tok/s':>16}{'TTFT p50':>10}{'TTFT p99':>10}{'per-stream tok/s':>18}")
    for name in ("one_at_a_time", "concurrent"):
        x = r[name]
        per = x["per_stream_tps_median"]
        print(f"{name:22}{x['aggregate_tps']:16.1f}{x['ttft_p50_s']:9.2f}s{x['ttft_p99_s']:9.2f}s"
              f"{per if per is None else round(per, 1):>18}")
    print(f"concurrent / one at a time: {r['concurrent_over_alone']:.2f}x ({r['concurrency']} streams)")
    llama = r.get("llama_cpp_batched")
    if llama and "decode_tps" in llama:
        ratio = r["concurrent"]["aggregate_tps"] / llama["decode_tps"]
        print(f"llama.cpp batched decode, batch {llama['batch']}: {llama['decode_tps']:.1f} tok/s; "
              f"qwenkit aggregate / llama.cpp: {ratio:.2f}x")
    elif llama:
        print(f"llama.cpp: {llama['error']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
