#!/usr/bin/env python
"""Speculative decoding: decode speed with and without guesses, side by side, with llama.cpp's prompt lookup as peer.

    python benchmarks/speculative.py                                # both parts, 3 repetitions
    python benchmarks/speculative.py --part lookup --reps 5
    python benchmarks/speculative.py --reps 1 --max-tokens 32 --allow-busy   # smoke test

Parts:
- draft: the target is the default model exported as f16 (`qwenkit export --type f16`, written once into
  <qwenkit cache>/bench/; or --target, any larger Qwen2.5 GGUF), the draft the default Q4_K_M (--draft). Code
  prompts. Draft lengths from --draft-lengths. llama-cpp-python exposes no draft-model decoding (only prompt
  lookup), so this part has no peer.
- lookup: the target is the default Q4_K_M; prompts benchmarks/prompts/code_edit.txt (return a file with one
  change) and tool_summary.txt (list what a tool's JSON said). Lookup lengths from --lookup-lengths. Peer:
  llama-cpp-python on the same file, plain and with LlamaPromptLookupDecoding(num_pred_tokens=N) (its default
  n-gram size 2), when it is installed (`make llama-cpp`).

Greedy, batch 1, --threads threads (default 2), the chat template applied, up to --max-tokens tokens. Decode tok/s =
(answer tokens - 1) / time from the first token to the last, as `qwenkit bench` counts it. Repetitions alternate:
rep 1 of every configuration, then rep 2, and so on, each after the CPUs are idle; medians are reported. Every
speculative answer is compared with the plain answer of the same engine ("same text").

Results: a table per part with the speed-up over the same engine without speculation, the share of guessed tokens
kept and tokens per target pass; everything in JSON (default benchmarks/results/speculative-<date>.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import wait_for_idle, write_result  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "prompts"
CODE_PROMPTS = [
    "Write a Python class LRUCache with get and put methods, using OrderedDict, with docstrings.",
    "Write a Python function that parses a CSV file of (name, age, city) rows and returns the average age per city.",
    "Write a JavaScript function debounce(fn, wait) with a cancel method, and a short usage example.",
]


def say(*parts) -> None:
    print(*parts, flush=True)


def f16_target() -> Path:
    """The default model exported as f16, written once into the cache (`qwenkit export --type f16`)."""
    from qwenkit import hub
    from qwenkit.hub.cache import home
    from qwenkit.tune.export import export_gguf

    out = home() / "bench" / "qwen2.5-coder-0.5b-f16.gguf"
    if not out.exists():
        say(f"exporting the default model as f16 to {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(hub.pull(hub.DEFAULT_MODEL, progress=False), out, "f16")
    return out


class Qwenkit:
    """One loaded target; an engine per speculation setting, each answering one request at a time."""

    def __init__(self, target: Path, draft: Path | None = None):
        import qwenkit

        self.model = qwenkit.load(target, pull=False)
        self.draft = qwenkit.load(draft, pull=False) if draft is not None else None
        self.engines: dict[str, object] = {}

    def add(self, name: str, **speculation) -> None:
        from qwenkit.engine.engine import Engine
        from qwenkit.engine.speculative import Speculation, check_vocabulary

        spec = None
        if speculation:
            if speculation.get("draft"):
                check_vocabulary(self.model.tokenizer, self.draft.tokenizer, "draft")
                speculation["draft"] = self.draft.model
            spec = Speculation(**speculation)
        engine = Engine(self.model.model, self.model.tokenizer, max_batch=1, speculation=spec)
        engine.start()
        self.engines[name] = engine

    def prompt_ids(self, text: str) -> list[int]:
        return self.model.prepare_chat([{"role": "user", "content": text}]).prompt_ids

    def answer(self, name: str, text: str, max_tokens: int) -> dict:
        p = self.model.prepare_chat([{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens)
        tokens, last = [], None
        for step in self.engines[name].submit(self.model.request(p), asynchronous=False):
            tokens += step.tokens
            last = step
        s = last.speculation
        return {"tokens": tokens, "decode_tps": last.generation_tps, "proposed": s.proposed if s else 0,
                "accepted": s.accepted if s else 0, "passes": s.decode_passes if s else len(tokens) - 1}


class LlamaCpp:
    """llama-cpp-python on the same GGUF file: plain, and with its prompt-lookup decoding."""

    STOP = frozenset({151643, 151645})

    def __init__(self, path: Path, lengths: list[int], threads: int):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        def make(draft):
            # a draft's guesses are checked against logits of every row, which llama-cpp-python keeps only with
            # logits_all
            return Llama(model_path=str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                         verbose=False, draft_model=draft, logits_all=draft is not None)

        self.llms = {"plain": make(None)}
        for n in lengths:
            self.llms[f"lookup {n}"] = make(LlamaPromptLookupDecoding(num_pred_tokens=n))

    def answer(self, name: str, prompt_ids: list[int], max_tokens: int) -> dict:
        llm = self.llms[name]
        llm.reset()
        tokens, first, last = [], 0.0, 0.0
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
            last = time.perf_counter()
            first = first or last
            if token in self.STOP:
                break
            tokens.append(token)
            if len(tokens) >= max_tokens:
                break
        return {"tokens": tokens, "decode_tps": (len(tokens) - 1) / max(last - first, 1e-9)}


def run_part(title: str, engines: list[tuple[str, str, object]], prompts: dict[str, str], args) -> list[dict]:
    """engines: (engine label, configuration name, runner with .answer(name, prompt, max_tokens)). Alternating
    repetitions; returns one row per (engine, configuration, prompt) with every repetition."""
    rows: dict[tuple[str, str, str], dict] = {}
    for rep in range(args.reps):
        for engine, config, runner in engines:
            for prompt_name, prompt in prompts.items():
                if not args.allow_busy:
                    wait_for_idle(0.15, 120, say)
                r = runner.answer(config, prompt, args.max_tokens)
                row = rows.setdefault((engine, config, prompt_name), {
                    "engine": engine, "config": config, "prompt": prompt_name, "reps": []})
                row["reps"].append({k: v for k, v in r.items() if k != "tokens"})
                row["tokens"] = r["tokens"]
        say(f"  {title}: repetition {rep + 1} of {args.reps} done")
    out = list(rows.values())
    for row in out:
        row["decode_tps"] = statistics.median(r["decode_tps"] for r in row["reps"])
        plain = rows[(row["engine"], "plain", row["prompt"])]
        row["speedup"] = row["decode_tps"] / plain["decode_tps"]
        row["same_text"] = row["tokens"] == plain["tokens"]
        row["answer_tokens"] = len(row["tokens"])
        last = row["reps"][-1]
        if "proposed" in last:
            row["acceptance"] = last["accepted"] / last["proposed"] if last["proposed"] else 0.0
            row["tokens_per_pass"] = (last["passes"] + last["accepted"]) / max(last["passes"], 1)
    for row in out:
        del row["tokens"]
    return out


def print_table(title: str, rows: list[dict]) -> None:
    say(f"\n{title}")
    say(f"{'engine':10} {'config':10} {'prompt':14} {'tokens':>6} {'decode tok/s':>12} {'speed-up':>8} "
        f"{'kept':>6} {'tok/pass':>8} {'same text':>9}")
    for r in rows:
        kept = f"{100 * r['acceptance']:.0f}%" if "acceptance" in r else "-"
        per_pass = f"{r['tokens_per_pass']:.2f}" if "tokens_per_pass" in r else "-"
        say(f"{r['engine']:10} {r['config']:10} {r['prompt']:14} {r['answer_tokens']:>6} {r['decode_tps']:>12.1f} "
            f"{r['speedup']:>7.2f}x {kept:>6} {per_pass:>8} {'yes' if r['same_text'] else 'NO':>9}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("draft", "lookup", "both"), default="both")
    p.add_argument("--target", type=Path, help="the draft part's target GGUF (default: the default model as f16)")
    p.add_argument("--draft", type=Path, help="the draft part's draft model (default: the default Q4_K_M)")
    p.add_argument("--draft-lengths", default="2,3,4,6")
    p.add_argument("--lookup-lengths", default="2,4,8")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allow-busy", action="store_true", help="do not wait for idle CPUs (smoke tests)")
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch

    from qwenkit import hub

    torch.set_num_threads(args.threads)
    default = hub.pull(hub.DEFAULT_MODEL, progress=False)
    result = {"cpu": platform.processor() or platform.machine(), "cpu_flags": _cpu_flags(), "threads": args.threads,
              "reps": args.reps, "max_tokens": args.max_tokens, "kernels": os.environ.get("QWENKIT_KERNELS"),
              "parts": {}}
    if args.part in ("draft", "both"):
        target = args.target or f16_target()
        ours = Qwenkit(target, args.draft or default)
        ours.add("plain")
        for n in [int(x) for x in args.draft_lengths.split(",")]:
            ours.add(f"draft {n}", draft=True, draft_tokens=n)
        prompts = {f"code {i + 1}": text for i, text in enumerate(CODE_PROMPTS)}
        rows = run_part("draft", [("qwenkit", name, ours) for name in ours.engines], prompts, args)
        result["parts"]["draft"] = {"target": str(target), "draft": str(args.draft or default), "rows": rows}
        args.out = write_result(result, "speculative", args.out)  # kept if the next part fails
        print_table(f"draft model: target {target.name}, draft {(args.draft or default).name}", rows)
        for engine in ours.engines.values():
            engine.shutdown(drain=False)
        del ours
    if args.part in ("lookup", "both"):
        lengths = [int(x) for x in args.lookup_lengths.split(",")]
        ours = Qwenkit(default)
        ours.add("plain")
        for n in lengths:
            ours.add(f"lookup {n}", lookup=n)
        texts = {name: (PROMPTS / f"{name}.txt").read_text() for name in ("code_edit", "tool_summary")}
        engines = [("qwenkit", name, ours) for name in ours.engines]
        peer = None
        if not args.no_peer:
            try:
                peer = LlamaCpp(default, lengths, args.threads)
            except ImportError:
                say("llama-cpp-python is not installed (make llama-cpp): no peer")
        if peer is not None:  # the same prompt tokens for both engines: qwenkit's chat rendering
            ids = {name: ours.prompt_ids(text) for name, text in texts.items()}
            engines += [("llama.cpp", name, _ByIds(peer, ids, texts)) for name in peer.llms]
        rows = run_part("lookup", engines, texts, args)
        result["parts"]["lookup"] = {"model": str(default), "rows": rows}
        print_table(f"prompt lookup: {default.name}", rows)
    write_result(result, "speculative", args.out)
    return 0


class _ByIds:
    """The peer answers the prompt's token ids (as qwenkit renders them), looked up by the prompt's text."""

    def __init__(self, peer: LlamaCpp, ids: dict[str, list[int]], texts: dict[str, str]):
        self.peer, self.by_text = peer, {texts[name]: ids[name] for name in ids}

    def answer(self, name: str, text: str, max_tokens: int) -> dict:
        return self.peer.answer(name, self.by_text[text], max_tokens)


def _cpu_flags() -> list[str]:
    from qwenkit.kernels.cpu import cpu_flags

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "asimddp", "i8mm")
    return [f for f in wanted if f in cpu_flags()]


if __name__ == "__main__":
    sys.exit(main())
