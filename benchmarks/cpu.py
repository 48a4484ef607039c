#!/usr/bin/env python
"""CPU speed of qwenkit, llama.cpp (llama-cpp-python) and transformers side by side, on the same GGUF file.

    python benchmarks/cpu.py                      # all three workloads, all three engines, 3 repetitions
    python benchmarks/cpu.py --workload q4_0 --engines qwenkit,llama.cpp --reps 5
    python benchmarks/cpu.py --reps 1 --prompt-tokens 32 --gen-tokens 8 --allow-busy   # smoke test

Batch 1, greedy, end-of-text ignored: prefill of a --prompt-tokens prompt (random token ids from a fixed seed, the
same for every engine), then --gen-tokens generated tokens. Prefill tok/s = prompt tokens / time to the first
token's logits; decode tok/s = (gen - 1) / time from the first to the last token (the first token comes from the
prefill), the convention of `qwenkit bench`.

Workloads: `real` = the default model (qwen2.5-coder:0.5b, Q4_K_M, pulled into the cache if needed); `q8_0`/`q4_0`
= a random-weight model of Qwen3-0.6B's shape built with qwenkit's own classes and written once as GGUF into
<qwenkit cache>/bench/ (tokenizer metadata borrowed from the default model); or a path to any .gguf file.

How it is measured. Each engine runs in its own worker process (this script with --_worker), which loads the model
once, warms up (one prefill and a few decode steps, not counted) and then waits for commands on stdin. Repetitions
alternate engines (rep 1 of each engine, then rep 2, ..., the order rotated each time), and only one worker runs at
a time. Peak RSS is the VmHWM of that worker's own process (load included). Two cores with 2 threads are fragile
(llama.cpp drops from 17 to 1 tok/s when another process takes a core), so before every repetition the script
waits until the CPUs are idle (busy share of all CPUs over 1 s, from /proc/stat), and after it compares the
machine's busy time during the repetition with the worker's own CPU time: a repetition in which other processes
used more than --idle-threshold of the CPUs is thrown away and retried (at most --max-retries times, then kept and
flagged; the 1-minute load average is only recorded: it lags a minute and counts our own previous repetition).
Decode GB/s = weight bytes read per token (GGUF tensor bytes for llama.cpp, the in-memory parameter and buffer
bytes for the torch engines; the embedding table counts only when it is also the output head) x decode tok/s, shown
against the machine's copy bandwidth (a large torch copy, read + write bytes, best of 10).

Results: a table and the ratios qwenkit/llama.cpp and qwenkit/transformers on stdout, everything (every repetition)
in JSON (default benchmarks/results/cpu-<date>.json). --profile adds a torch.profiler summary of one qwenkit decode
step per workload.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENGINES = ("qwenkit", "llama.cpp", "transformers")
WORKLOADS = ("real", "q8_0", "q4_0")
DEFAULT_MODEL = "qwen2.5-coder:0.5b"
LLAMA_MISSING = "llama.cpp: not installed — run `make llama-cpp` (30-40 min once per machine)"
FIRST_ADDED_TOKEN = 151643  # prompt ids stay below <|endoftext|>: plain BPE tokens only
RANDOM_RECIPE = "v1"  # bump when the random model's recipe changes, so cached files are rebuilt
QWEN3_06B_SHAPE = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
)
LOAD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 1800

from benchmarks.common import (  # noqa: E402
    TimingStreamer, cpu_jiffies, machine_info, proc_status, process_jiffies, result_path, wait_for_idle)


# ==== machine state: idle CPUs, memory ================================================================================

# ==== workers: one process per engine ================================================================================

def torch_weight_bytes(model, head) -> int:
    """Bytes of weights one decode token reads: every parameter and buffer once (shared ones once), except the
    embedding table when it is not also the output head (a lookup reads one row), and the rotary tables.
    `head` is the output head module (or tensor)."""
    import itertools

    import torch

    if head is None:
        head_tensors = []
    elif isinstance(head, torch.Tensor):
        head_tensors = [head]
    else:
        head_tensors = list(head.parameters()) + list(head.buffers())
    head_ptrs = {t.data_ptr() for t in head_tensors}
    seen, total = set(), 0
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False),
                              model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if t.device.type == "meta" or (t.data_ptr(), t.nbytes) in seen:
            continue
        if "embed_tokens" in name and t.data_ptr() not in head_ptrs:
            continue  # a lookup table only (a shared head tensor is counted when met under the head's name)
        if any(k in name for k in ("rotary", "inv_freq", "rope")):
            continue
        seen.add((t.data_ptr(), t.nbytes))
        total += t.nbytes
    return total


def module_kinds(model) -> dict[str, int]:
    """How many leaf layers of each kind (Linear, QuantLinear int8, ...): what the weights were turned into."""
    kinds: dict[str, int] = {}
    for module in model.modules():
        has_tensors = list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))
        if next(module.children(), None) is None and has_tensors:
            kind = type(module).__name__ + (f" {module.kind}" if isinstance(getattr(module, "kind", None), str) else "")
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class QwenkitRunner:
    def __init__(self, path: str, threads: int, quant: str | None, ctx: int, **_):
        import inspect

        import torch

        import qwenkit

        kwargs = {"threads": threads, "pull": False}
        self.note = None
        if quant is not None:
            if "quant" in inspect.signature(qwenkit.load).parameters:
                kwargs["quant"] = quant
            else:
                self.note = f"qwenkit.load has no quant argument yet: --quant {quant} ignored"
        started = time.perf_counter()
        self.m = qwenkit.load(path, **kwargs)
        net = self.m.model
        head = net.lm_head if getattr(net, "lm_head", None) is not None else net.model.embed_tokens  # tied: the table
        self.info = {
            "load_s": time.perf_counter() - started,
            "threads": torch.get_num_threads(),
            "weight_bytes_per_token": torch_weight_bytes(net, head),
            "quant": getattr(self.m, "quant", None) or kwargs.get("quant"),
            "dtype": str(getattr(net, "dtype", None)),
            "layers": module_kinds(net),
            "version": qwenkit.__version__,
            "note": self.note,
        }

    def _request(self, prompt: list[int], gen: int):
        from qwenkit.engine.engine import GenerationRequest
        from qwenkit.engine.sampling import SamplingParams

        # no stop ids: end-of-text ignored
        return GenerationRequest(prompt, SamplingParams(temperature=0.0, seed=0), max_new_tokens=gen)

    def run(self, prompt: list[int], gen: int) -> dict:
        """One request through the model's engine, as every entry point generates. A fresh engine each time: the
        repetitions repeat the prompt, which the prefix cache would otherwise serve without a prefill."""
        self.m.start_engine()
        tokens, last = [], None
        for step in self.m.stream(self._request(prompt, gen)):
            tokens += step.tokens
            last = step
        decode_s = (len(tokens) - 1) / last.generation_tps if len(tokens) > 1 else 0.0
        return {"prefill_s": last.time_to_first_token, "decode_s": decode_s, "n_tokens": len(tokens),
                "tokens": tokens[:32]}

    def profile(self, prompt: list[int], warm: int = 3) -> str:
        """torch.profiler summary of one decode step (forward of one token + greedy sampling), after `warm` steps:
        time per module role (inclusive, from hooks that label each submodule's call) and the top ops by self CPU
        time (compiled regions show up as CompiledFxGraph calls, hence the module view). The engine is stepped in
        this thread (its worker not started), one scheduler step at a time."""
        from torch.profiler import ProfilerActivity, profile

        from qwenkit.engine.engine import Engine

        hooks = label_modules(self.m.model)  # before the warm-up, so any recompilation they cause happens there
        try:
            engine = Engine(self.m.model, self.m.tokenizer)
            engine.submit(self._request(prompt, warm + 2))
            for _ in range(warm + 1):  # the first step is the prefill (prompts up to 512 tokens), then decode steps
                engine.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                engine.step()
                wall = time.perf_counter() - started
        finally:
            for h in hooks:
                h.remove()
        events = prof.key_averages()
        lines = [f"one qwenkit decode step at position {len(prompt) + warm}: {wall * 1e3:.1f} ms wall",
                 "  by module (inclusive: self_attn contains its projections; calls summed over layers):"]
        modules = sorted((e for e in events if e.key.startswith("module: ")), key=lambda e: -e.cpu_time_total)
        for e in modules:
            ms = e.cpu_time_total / 1e3
            lines.append(f"    {e.key[8:]:<40}{ms:9.2f} ms {ms / (wall * 1e3):7.1%}  x{e.count}")
        lines.append("  top ops by self CPU time:")
        ops = [e for e in events if not e.key.startswith("module: ")]
        ops.sort(key=lambda e: -e.self_cpu_time_total)
        for e in ops[:20]:
            ms = e.self_cpu_time_total / 1e3
            lines.append(f"    {e.key[:60]:<62}{ms:9.2f} ms {ms / (wall * 1e3):7.1%}  x{e.count}")
        return "\n".join(lines)


def label_modules(net) -> list:
    """Forward hooks that wrap each submodule call (not whole decoder layers) in a profiler range named by its
    role (q_proj, qkv_proj, mlp, ...) and class, so the profile adds up time per role across layers."""
    import torch

    stack, handles = [], []

    def pre(module, args, label):
        rf = torch.profiler.record_function(label)
        rf.__enter__()
        stack.append(rf)

    def post(module, args, output):
        stack.pop().__exit__(None, None, None)

    for name, module in net.named_modules():
        role = name.rsplit(".", 1)[-1]
        if not name or role.isdigit() or isinstance(module, torch.nn.ModuleList):
            continue
        kind = getattr(module, "kind", None)
        label = f"module: {role} ({type(module).__name__}{' ' + kind if isinstance(kind, str) else ''})"
        handles.append(module.register_forward_pre_hook(lambda m, a, label=label: pre(m, a, label)))
        handles.append(module.register_forward_hook(post))
    return handles


class LlamaCppRunner:
    def __init__(self, path: str, threads: int, ctx: int, **_):
        import inspect

        import llama_cpp
        import numpy as np

        self.np, self.llama_cpp = np, llama_cpp
        started = time.perf_counter()
        # n_batch 512 = qwenkit's prefill chunk; logits of the last position only, as in generation. Options this
        # llama-cpp-python version does not know are left to its defaults.
        wanted = dict(model_path=path, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, logits_all=False, verbose=False)
        known = inspect.signature(llama_cpp.Llama.__init__).parameters
        self.llm = llama_cpp.Llama(**{k: v for k, v in wanted.items() if k in known})
        self.n_vocab = self.llm.n_vocab()
        self.info = {"load_s": time.perf_counter() - started, "threads": threads,
                     "version": getattr(llama_cpp, "__version__", None)}

    def _next(self) -> int:
        """Greedy: argmax of the last position's logits (so end-of-text is just another token)."""
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = self.np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, prompt: list[int], gen: int) -> dict:
        self.llm.reset()  # forget the previous repetition: no prompt-prefix reuse between repetitions
        started = time.perf_counter()
        self.llm.eval(prompt)
        token = self._next()
        first = time.perf_counter()
        tokens = [token]
        for _ in range(gen - 1):
            self.llm.eval([token])
            token = self._next()
            tokens.append(token)
        last = time.perf_counter()
        return {"prefill_s": first - started, "decode_s": last - first, "n_tokens": len(tokens), "tokens": tokens[:32]}


class TransformersRunner:
    def __init__(self, path: str, threads: int, hf_dtype: str, **_):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        p = Path(path)
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                          dtype=getattr(torch, hf_dtype))
        self.model.eval()
        self.info = {"load_s": time.perf_counter() - started, "threads": torch.get_num_threads(), "dtype": hf_dtype,
                     "weight_bytes_per_token": torch_weight_bytes(self.model, self.model.get_output_embeddings()),
                     "version": transformers.__version__}

    def run(self, prompt: list[int], gen: int) -> dict:
        torch = self.torch
        ids = torch.tensor([prompt], dtype=torch.long)
        streamer = TimingStreamer()
        started = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=gen, min_new_tokens=gen,
                streamer=streamer, pad_token_id=FIRST_ADDED_TOKEN, temperature=None, top_p=None, top_k=None,
            )
        if len(streamer.tokens) != gen:
            raise RuntimeError(f"transformers generated {len(streamer.tokens)} tokens, expected {gen}")
        first, last = streamer.times[0], streamer.times[-1]
        return {"prefill_s": first - started, "decode_s": last - first, "n_tokens": len(streamer.tokens),
                "tokens": streamer.tokens[:32]}


RUNNERS = {"qwenkit": QwenkitRunner, "llama.cpp": LlamaCppRunner, "transformers": TransformersRunner}


def worker_main(args) -> int:
    """Protocol: one JSON line out when loaded ({"ready": ...} or {"error": ...}), then one JSON line in, one out."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print to stdout must not break the protocol
    sys.stdout = sys.stderr

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        runner = RUNNERS[args._worker](path=args._model, threads=args.threads, quant=args.quant, ctx=args._ctx,
                                       hf_dtype=args.transformers_dtype)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which carries on with other engines
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    send({"ready": True, **runner.info})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "run":
                out = runner.run(cmd["prompt"], cmd["gen"])
            elif cmd["cmd"] == "profile":
                out = {"table": runner.profile(cmd["prompt"])}
            elif cmd["cmd"] == "stats":
                out = {"peak_rss_bytes": proc_status("VmHWM"), "rss_bytes": proc_status("VmRSS")}
            elif cmd["cmd"] == "quit":
                send({"bye": True})
                return 0
            else:
                out = {"error": f"unknown command {cmd['cmd']!r}"}
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"}
        send(out)
    return 0


class Worker:
    """The parent's handle on one engine's worker process."""

    def __init__(self, engine: str, path: Path, args, ctx: int, logdir: Path):
        self.engine = engine
        self.log_path = logdir / f"{engine}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", engine, "--_model", str(path),
               "--_ctx", str(ctx), "--threads", str(args.threads), "--transformers-dtype", args.transformers_dtype]
        if args.quant is not None:
            cmd += ["--quant", args.quant]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=str(ROOT))
        self.pid = self.proc.pid

    def receive(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.poll()
            why = "timed out" if not ready else f"exited with status {self.proc.returncode}"
            return {"error": f"worker {why}; last log lines:\n{self.log_tail()}"}
        return json.loads(line)

    def ask(self, cmd: dict, timeout: float = RUN_TIMEOUT_S) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"error": f"worker is gone; last log lines:\n{self.log_tail()}"}
        return self.receive(timeout)

    def log_tail(self, n: int = 15) -> str:
        self.log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("      " + line for line in lines[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"cmd": "quit"}, timeout=30)
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ==== workloads: files ================================================================================================

def bench_dir() -> Path:
    from qwenkit.hub.cache import home

    return home() / "bench"


def random_gguf_path(qtype: str, seed: int) -> Path:
    return bench_dir() / f"qwen3-0.6b-shape-random-{RANDOM_RECIPE}-seed{seed}-{qtype}.gguf"


def build_random_gguf(qtype: str, dest: Path, seed: int) -> None:
    """Write a random-weight model of Qwen3-0.6B's shape as GGUF: normal(0, 0.02) weights, ones for the norms, the
    default model's tokenizer metadata (llama.cpp needs a vocabulary to load a file)."""
    import gguf
    import torch

    from qwenkit import hub
    from qwenkit.checkpoint.gguf import GGUFFile
    from qwenkit.checkpoint.loader import empty_model
    from qwenkit.model.config import ModelConfig
    from qwenkit.checkpoint.gguf_write import write_gguf

    source = GGUFFile(hub.pull(DEFAULT_MODEL))
    meta = {}
    for key, value in source.metadata.items():
        if key.startswith("tokenizer."):
            vtype = source.metadata_types[key]
            vtype = vtype[0] if isinstance(vtype, tuple) else vtype
            meta[key] = (value, gguf.GGUFValueType(int(vtype)))
    config = ModelConfig(**QWEN3_06B_SHAPE)
    torch.manual_seed(seed)
    model = empty_model(config, torch.float32)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    try:
        written = write_gguf(model, tmp, qtype=gguf.GGMLQuantizationType[qtype.upper()], tokenizer_meta=meta)
        os.replace(written, dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_workload(name: str, seed: int, say) -> tuple[Path, str]:
    """(GGUF path, description) of a workload, building the random-weight files on first use."""
    if name == "real":
        from qwenkit import hub

        return Path(hub.pull(DEFAULT_MODEL)), f"{DEFAULT_MODEL} (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M)"
    if name in ("q8_0", "q4_0"):
        path = random_gguf_path(name, seed)
        if not path.exists():
            say(f"  building {path} (random weights, Qwen3-0.6B shape, {name.upper()}; once per machine)...")
            started = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_build", name, "--_model", str(path),
                   "--seed", str(seed)]
            done = subprocess.run(cmd, cwd=str(ROOT))
            if done.returncode != 0 or not path.exists():
                raise RuntimeError(f"building the {name} workload failed (status {done.returncode})")
            say(f"  built in {time.perf_counter() - started:.0f} s")
        return path, f"random-weight Qwen3-0.6B shape, {name.upper()}"
    path = Path(name).expanduser()
    if not path.is_file():
        raise RuntimeError(f"unknown workload {name!r}: use real, q8_0, q4_0 or a path to a .gguf file")
    return path, path.name


def gguf_facts(path: Path, tokens: int) -> dict:
    """Bytes of weights llama.cpp reads per decode token and the KV cache size, from the file's header."""
    from qwenkit.checkpoint.gguf import GGUFFile
    from qwenkit.model.config import ModelConfig

    f = GGUFFile(path)
    tied = "output.weight" not in f.tensors
    weight_bytes = sum(t.nbytes for n, t in f.tensors.items() if tied or n != "token_embd.weight")
    c = ModelConfig.from_gguf_metadata(f.metadata, str(path))
    kv_f16 = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * tokens * 2
    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return {"file_bytes": path.stat().st_size, "gguf_weight_bytes_per_token": weight_bytes,
            "kv_cache_f16_bytes": kv_f16, "architecture": c.model_type, "layers": c.num_hidden_layers,
            "tensor_types": types}


def measure_bandwidth(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    n = 256 * 2**20 // 4  # 256 MiB per buffer, far beyond any cache
    src, dst = torch.ones(n), torch.zeros(n)
    copies, reads = [], []
    for _ in range(10):
        started = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - started)
    for _ in range(10):
        started = time.perf_counter()
        src.sum()
        reads.append(time.perf_counter() - started)
    return {"copy_gbps": 2 * src.nbytes / min(copies) / 1e9,
            "copy_gbps_median": 2 * src.nbytes / statistics.median(copies) / 1e9,
            "read_gbps": src.nbytes / min(reads) / 1e9, "buffer_bytes": src.nbytes, "threads": threads,
            "convention": "copy: read + write bytes per second (STREAM), best of 10; read: torch.sum, best of 10"}


# ==== the run =========================================================================================================

def run_rep(worker: Worker, prompt: list[int], args, say) -> dict:
    """One measured repetition on idle CPUs; retried while other processes took more than the threshold."""
    retries = 0
    while True:
        waited, idle_share = wait_for_idle(args.idle_threshold, args.max_wait, say)
        if idle_share > args.idle_threshold and args.max_wait > 0:
            say(f"    CPUs still {idle_share:.0%} busy after {waited:.0f} s: measuring anyway (flagged)")
        load1 = os.getloadavg()[0]
        b0, t0 = cpu_jiffies()
        w0, s0 = process_jiffies(worker.pid), process_jiffies()
        out = worker.ask({"cmd": "run", "prompt": prompt, "gen": args.gen_tokens})
        b1, t1 = cpu_jiffies()
        w1, s1 = process_jiffies(worker.pid), process_jiffies()
        if "error" in out:
            return out
        other = max(0, (b1 - b0) - (w1 - w0) - (s1 - s0)) / max(t1 - t0, 1)
        out.update(other_cpu_share=other, busy_before=idle_share, waited_s=waited, loadavg1=load1, retries=retries,
                   contended=other > args.idle_threshold)
        out["prefill_tps"] = len(prompt) / out["prefill_s"]
        out["decode_tps"] = (out["n_tokens"] - 1) / out["decode_s"] if out["n_tokens"] > 1 else None
        if not out["contended"] or retries >= args.max_retries or waited >= args.max_wait:
            return out  # a clean rep, out of retries, or a machine that never became idle (kept, flagged)
        retries += 1
        say(f"    {worker.engine}: other processes took {other:.0%} of the CPUs during the repetition; retrying")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_workload(name: str, args, prompt: list[int], bandwidth: dict, llama_ok: bool, say) -> dict:
    path, description = ensure_workload(name, args.seed, say)
    ctx = len(prompt) + args.gen_tokens + 8
    facts = gguf_facts(path, len(prompt) + args.gen_tokens)
    result = {"workload": name, "description": description, "path": str(path), **facts, "engines": {}}
    say(f"\n== {name}: {description}\n   {path} ({facts['file_bytes'] / 1e6:.0f} MB)")
    workers: dict[str, Worker] = {}
    logdir = Path(tempfile.mkdtemp(prefix=f"qwenkit-bench-{Path(name).name}-"))  # name may be a path
    try:
        for engine in args.engines:
            if engine == "llama.cpp" and not llama_ok:
                result["engines"][engine] = {"status": "not installed", "error": LLAMA_MISSING}
                say(f"  {LLAMA_MISSING}")
                continue
            say(f"  loading {engine}...")
            w = Worker(engine, path, args, ctx, logdir)
            ready = w.receive(LOAD_TIMEOUT_S)
            if "error" in ready:
                say(f"  {engine}: failed to load: {ready['error']}")
                result["engines"][engine] = {"status": "failed", "error": ready["error"]}
                w.close()
                continue
            ready.pop("ready", None)
            if ready.get("note"):
                say(f"  {engine}: {ready['note']}")
            if engine == "llama.cpp":
                ready["weight_bytes_per_token"] = facts["gguf_weight_bytes_per_token"]
            result["engines"][engine] = {"status": "ok", **ready, "reps": []}
            workers[engine] = w
            say(f"  {engine}: loaded in {ready['load_s']:.1f} s")
            if args.warmup:
                warm = w.ask({"cmd": "run", "prompt": prompt, "gen": min(args.gen_tokens, 4)})
                if "error" in warm:
                    say(f"  {engine}: warm-up failed: {warm['error']}")
                    result["engines"][engine].update(status="failed", error=warm["error"])
                    workers.pop(engine).close()
        order = list(workers)
        for rep in range(args.reps):
            shift = rep % len(order) if order else 0
            for engine in order[shift:] + order[:shift]:  # alternate engines, rotating who goes first
                if engine not in workers:
                    continue
                out = run_rep(workers[engine], prompt, args, say)
                entry = result["engines"][engine]
                if "error" in out:
                    say(f"  {engine}: repetition failed: {out['error']}")
                    entry.update(status="failed", error=out["error"])
                    workers.pop(engine).close()
                    continue
                out["rep"] = rep
                entry["reps"].append(out)
                say(f"  rep {rep + 1}/{args.reps} {engine:<12} prefill {out['prefill_tps']:7.1f} tok/s  decode "
                    f"{fmt(out['decode_tps'], '7.2f')} tok/s  (others {out['other_cpu_share']:.0%}"
                    f"{', retried ' + str(out['retries']) if out['retries'] else ''}"
                    f"{', CONTENDED' if out['contended'] else ''})")
        for engine, w in workers.items():
            stats = w.ask({"cmd": "stats"}, timeout=60)
            result["engines"][engine].update({k: v for k, v in stats.items() if k != "error"})
        if args.profile and "qwenkit" in workers:
            out = workers["qwenkit"].ask({"cmd": "profile", "prompt": prompt})
            result["qwenkit_profile"] = out.get("table") or out.get("error")
    finally:
        for w in workers.values():
            w.close()
    if any(e.get("status") == "failed" for e in result["engines"].values()):
        result["worker_logs"] = str(logdir)
        say(f"  worker logs kept in {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    summarize(result, bandwidth)
    return result


def summarize(result: dict, bandwidth: dict) -> None:
    copy = bandwidth.get("copy_gbps")
    for entry in result["engines"].values():
        reps = entry.get("reps") or []
        if not reps:
            continue
        entry["prefill_tps"] = median(r["prefill_tps"] for r in reps)
        entry["decode_tps"] = median(r["decode_tps"] for r in reps)
        entry["retried"] = sum(r["retries"] for r in reps)
        entry["contended"] = sum(r["contended"] for r in reps)
        if entry.get("weight_bytes_per_token") and entry["decode_tps"]:
            entry["decode_gbps"] = entry["weight_bytes_per_token"] * entry["decode_tps"] / 1e9
            entry["decode_share_of_copy_bw"] = entry["decode_gbps"] / copy if copy else None
    # The KV cache as both on-device engines keep it: float16 (llama.cpp's default; qwenkit's on the block kernels)
    budget = 1.3 * result["file_bytes"] + result["kv_cache_f16_bytes"]
    result["rss_budget_bytes"] = budget
    for entry in result["engines"].values():
        if entry.get("peak_rss_bytes"):
            entry["peak_rss_over_budget"] = entry["peak_rss_bytes"] / budget
    q = result["engines"].get("qwenkit", {})
    ratios = {}
    for peer in ("llama.cpp", "transformers"):
        p = result["engines"].get(peer, {})
        for what in ("prefill_tps", "decode_tps"):
            if q.get("status") == p.get("status") == "ok" and q.get(what) and p.get(what):
                ratios[f"qwenkit/{peer} {what.split('_')[0]}"] = q[what] / p[what]
    result["ratios"] = ratios


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(result: dict, args, bandwidth: dict) -> None:
    copy = bandwidth.get("copy_gbps")
    print(f"\n{result['workload']}: {result['description']}  ({result['file_bytes'] / 1e6:.0f} MB file; prompt "
          f"{args.prompt_tokens}, gen {args.gen_tokens}, threads {args.threads}, median of {args.reps})")
    print(f"  {'engine':<13}{'prefill tok/s':>14}{'decode tok/s':>14}{'MB/token':>10}{'decode GB/s':>13}{'of copy':>9}"
          f"{'peak RSS GB':>13}{'load s':>8}{'retried':>9}")
    for engine, e in result["engines"].items():
        if e.get("status") != "ok":
            print(f"  {engine:<13}{e.get('error', e.get('status')).splitlines()[0]}")
            continue
        share = e.get("decode_share_of_copy_bw")
        print(f"  {engine:<13}{fmt(e.get('prefill_tps'), '14.1f', '-'.rjust(14))}"
              f"{fmt(e.get('decode_tps'), '14.2f', '-'.rjust(14))}"
              f"{fmt(e.get('weight_bytes_per_token') and e['weight_bytes_per_token'] / 1e6, '10.0f', '-'.rjust(10))}"
              f"{fmt(e.get('decode_gbps'), '13.1f', '-'.rjust(13))}"
              f"{fmt(share and share * 100, '8.0f', '-'.rjust(8))}%"
              f"{fmt(e.get('peak_rss_bytes') and e['peak_rss_bytes'] / 1e9, '13.2f', '-'.rjust(13))}"
              f"{e.get('load_s', 0):8.1f}{e.get('retried', 0):9d}"
              + (f"  ({e['contended']} rep(s) kept on busy CPUs)" if e.get("contended") else ""))
    r = result["ratios"]
    for peer, targets in (("llama.cpp", "targets: both >= 1x"), ("transformers", "target: decode >= 4x")):
        pre, dec = r.get(f"qwenkit/{peer} prefill"), r.get(f"qwenkit/{peer} decode")
        if pre or dec:
            print(f"  qwenkit/{peer}: prefill {fmt(pre, '.2f')}x, decode {fmt(dec, '.2f')}x ({targets})")
    q = result["engines"].get("qwenkit", {})
    if q.get("peak_rss_over_budget"):
        print(f"  qwenkit peak RSS = {q['peak_rss_over_budget']:.2f}x the budget (1.3 x file + float16 KV cache = "
              f"{result['rss_budget_bytes'] / 1e9:.2f} GB)")
    if copy:
        print(f"  decode GB/s = weight bytes per token x decode tok/s; copy bandwidth {copy:.1f} GB/s")
    if result.get("qwenkit_profile"):
        print("\n" + result["qwenkit_profile"])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/cpu.py) for how each figure is measured.")
    ap.add_argument("--workload", default=",".join(WORKLOADS),
                    help="comma-separated: real, q8_0, q4_0, or paths to .gguf files (default: all three)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset of qwenkit,llama.cpp,transformers (default: all)")
    ap.add_argument("--reps", type=int, default=3, help="measured repetitions per engine (median reported)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine")
    ap.add_argument("--quant", choices=("auto", "int8", "int4", "none"), default=None,
                    help="passed to qwenkit.load (when it accepts quant=); default: qwenkit's own default")
    ap.add_argument("--transformers-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt tokens and of the random-weight models")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one unmeasured run per engine after loading (default: on)")
    ap.add_argument("--idle-threshold", type=float, default=0.05,
                    help="share of all CPUs other processes may use before/during a repetition (default 0.05)")
    ap.add_argument("--max-wait", type=float, default=300,
                    help="seconds to wait for idle CPUs before a repetition (then it runs anyway, flagged)")
    ap.add_argument("--max-retries", type=int, default=3, help="retries of a repetition that did not get the CPUs")
    ap.add_argument("--allow-busy", action="store_true",
                    help="do not wait for idle CPUs or retry (smoke tests on a shared machine; results flagged)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler summary of one qwenkit decode step")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/cpu-<date>.json)")
    for hidden in ("--_worker", "--_model", "--_build"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ctx", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--_bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {', '.join(bad)} (choose from {', '.join(ENGINES)})")
    args.workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    if args.reps < 1 or args.prompt_tokens < 1 or args.gen_tokens < 2 or args.threads < 1:
        ap.error("--reps, --prompt-tokens, --threads must be >= 1 and --gen-tokens >= 2")
    if args.allow_busy:
        args.max_wait, args.max_retries = 0, 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args)
    if args._build:
        build_random_gguf(args._build, Path(args._model), args.seed)
        return 0
    if args._bandwidth:
        print(json.dumps(measure_bandwidth(args.threads)))
        return 0

    def say(msg: str) -> None:
        print(msg, flush=True)

    llama_ok = importlib.util.find_spec("llama_cpp") is not None
    if "llama.cpp" in args.engines and not llama_ok:
        say(LLAMA_MISSING)
    prompt = [random.Random(args.seed).randrange(FIRST_ADDED_TOKEN) for _ in range(args.prompt_tokens)]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(("torch", "transformers", "gguf", "llama_cpp_python", "numpy")),
              "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out"},
              "prompt": prompt, "workloads": {}}
    report["settings"]["llama_cpp_installed"] = llama_ok

    waited, share = wait_for_idle(args.idle_threshold, args.max_wait, say)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_bandwidth", "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    bandwidth = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}
    bandwidth["busy_before"] = share
    report["memory_bandwidth"] = bandwidth
    if "copy_gbps" in bandwidth:
        say(f"memory: copy {bandwidth['copy_gbps']:.1f} GB/s (read+write), read {bandwidth['read_gbps']:.1f} GB/s, "
            f"{args.threads} threads{' (CPUs were busy: low)' if share > args.idle_threshold else ''}")
    else:
        say(f"memory bandwidth measurement failed: {bandwidth['error']}")

    out = args.out or result_path("cpu")
    try:
        for name in args.workloads:
            try:
                report["workloads"][name] = run_workload(name, args, prompt, bandwidth, llama_ok, say)
            except Exception as e:  # noqa: BLE001 - one broken workload should not lose the others
                traceback.print_exc()
                report["workloads"][name] = {"workload": name, "error": f"{type(e).__name__}: {e}"}
                say(f"{name}: failed: {type(e).__name__}: {e}")
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    print("\n" + "=" * 100)
    if "copy_gbps" in bandwidth:
        print(f"copy bandwidth {bandwidth['copy_gbps']:.1f} GB/s (read + write bytes, {args.threads} threads)")
    if "llama.cpp" in args.engines and not llama_ok:
        print(LLAMA_MISSING)
    for result in report["workloads"].values():
        if "error" in result:
            print(f"\n{result['workload']}: failed: {result['error']}")
        else:
            print_table(result, args, bandwidth)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
