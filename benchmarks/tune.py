#!/usr/bin/env python
"""LoRA training speed and memory: qwenkit's trainer against transformers + peft, same model, same batches.

    python benchmarks/tune.py                      # Qwen2.5-0.5B's shape, random weights, 8 steps of 4 examples
    python benchmarks/tune.py --steps 3 --shape tiny

Both sides train the same LoRA (r 16, alpha 32, q/k/v/o/gate/up/down) with AdamW on the same micro-batches of the
HSK zh->en data (scripts/hsk_tune_data.py; tokenized once with the default model's tokenizer and chat template,
assistant-only labels), fp32 unless --dtype bf16, 2 threads. The model is a random-weight checkpoint of the chosen
shape written once with transformers (safetensors) and loaded by both. Each side runs in its own process, one after the other, so that
peak RSS is its own, alternating for --reps runs each. Reported: per run, the median training tokens/s over the
steps after the first (warm-up) and peak RSS; then the medians over runs and the ratio qwenkit / peft (target: >= 1.5x
tokens/s at no more memory). Tokens are the examples' own (padding excluded); --pack has qwenkit train on packed
micro-batches (`qwenkit tune --pack`), which compute no padding at all.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(shape: str, steps: int, batch: int, work: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import qwenkit
    from qwenkit.tune.data import load_examples

    folder = work / f"model-{shape}"
    if not (folder / "model.safetensors").exists():
        config = AutoConfig.for_model("qwen2", **SHAPES[shape])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    data = work / f"batches-{steps}x{batch}.json"
    if not data.exists():
        hsk = Path(subprocess.run([sys.executable, "scripts/hsk_tune_data.py"], capture_output=True, text=True,
                                  check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()[-1])
        model = qwenkit.load("qwen2.5-coder:0.5b")
        examples, _ = load_examples(model, hsk, max_len=512)
        rows = [[{"ids": e.input_ids, "labels": e.labels} for e in examples[i * batch:(i + 1) * batch]]
                for i in range(steps)]
        data.write_text(json.dumps(rows))
    return folder, data


def worker(side: str, folder: Path, data: Path, threads: int, pack: bool = False, dtype: str = "fp32") -> dict:
    import torch

    from qwenkit.tune.data import Example
    from qwenkit.tune.train import collate, summed_loss

    torch.set_num_threads(threads)
    weights = torch.bfloat16 if dtype == "bf16" else torch.float32
    batches = [[Example(r["ids"], r["labels"], 0) for r in b] for b in json.loads(data.read_text())]
    if side == "qwenkit":
        from qwenkit.checkpoint.loader import load_weights
        from qwenkit.tune.lora import LoRAConfig, apply_lora

        model, _ = load_weights(folder, weights)
        apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=TARGETS), seed=0)
    else:
        import peft
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(folder, dtype=weights, attn_implementation="sdpa")
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    speeds = []
    for group in batches:
        ids, labels = collate(group)
        start = time.perf_counter()
        if side == "qwenkit":  # the trainer's own loss (qwenkit.tune.train.summed_loss)
            total, count = summed_loss(model, group, pack)
            loss = total / count
        else:  # transformers' training forward: logits at every position, loss over the labelled ones
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the examples' own tokens: padding (which --pack does not compute) is no training data
        speeds.append(sum(len(e.input_ids) for e in group) / (time.perf_counter() - start))
    return {"side": side, "tokens_per_s": statistics.median(speeds[1:] or speeds), "steps": len(speeds),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "last_loss": loss.item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="runs of each side, alternating (medians reported)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qwenkit" / "bench-tune")
    ap.add_argument("--worker", choices=("qwenkit", "peft"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pack", action="store_true", help="qwenkit packs each micro-batch (qwenkit tune --pack)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="both sides' base weights (adapters train in fp32 either way)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.data, args.threads, args.pack, args.dtype)))
        return 0
    from benchmarks.common import write_result

    args.work.mkdir(parents=True, exist_ok=True)
    folder, data = prepare(args.shape, args.steps, args.batch_size, args.work)
    runs: dict[str, list[dict]] = {"qwenkit": [], "peft": []}
    for rep in range(args.reps):  # alternating sides, each in a fresh process
        for side in ("qwenkit", "peft"):
            proc = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", str(folder), "--data",
                                   str(data), "--threads", str(args.threads), "--dtype", args.dtype,
                                   *(["--pack"] if args.pack else [])],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[side].append(r)
            print(f"rep {rep + 1} {side:8} {r['tokens_per_s']:8.1f} tok/s  peak RSS {r['peak_rss_gb']:.2f} GB  "
                  f"loss {r['last_loss']:.3f}", flush=True)
    results = {side: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rs), "runs": rs}
               for side, rs in runs.items()}
    ratio = results["qwenkit"]["tokens_per_s"] / results["peft"]["tokens_per_s"]
    mem = results["qwenkit"]["peak_rss_gb"] / results["peft"]["peak_rss_gb"]
    print(f"medians: qwenkit {results['qwenkit']['tokens_per_s']:.1f}, peft {results['peft']['tokens_per_s']:.1f} "
          f"tok/s; qwenkit/peft: {ratio:.2f}x tokens/s, {mem:.2f}x peak memory")
    write_result({"shape": args.shape, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                  "reps": args.reps, "pack": args.pack, "dtype": args.dtype,
                  "results": results, "speed_ratio": round(ratio, 3), "memory_ratio": round(mem, 3)}, "tune", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
