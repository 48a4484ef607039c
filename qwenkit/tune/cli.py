"""`qwenkit tune MODEL --data train.jsonl --out DIR`: LoRA on a chat dataset, with progress, eval and resume."""

from __future__ import annotations

import argparse
import json
import sys

from qwenkit.tune.lora import DEFAULT_TARGETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="base model: short name, Hugging Face id, or path (a GGUF base is dequantized)")
    p.add_argument("--data", required=True, help="training JSONL: OpenAI messages, ShareGPT or Alpaca lines")
    p.add_argument("--eval", help="held-out JSONL in the same formats")
    p.add_argument("--out", required=True, help="folder for the adapter, checkpoints and train_log.jsonl")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1; --max-steps overrides)")
    p.add_argument("--max-steps", type=int, help="the run's length in optimizer steps, repeating the data as needed")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-len", type=int, default=1024, help="longest example in tokens (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--on-bad-example", choices=("stop", "skip"), default="stop",
                   help="a malformed, unknown-role or too-long line stops the run (default) or is skipped")
    p.add_argument("--train-on", choices=("assistant", "all"), default="assistant",
                   help="loss on assistant turns only (default) or on every token")
    p.add_argument("--pack", action="store_true", help="each micro-batch's examples end to end in one row, attention "
                   "kept inside each example (no padding to compute; the same loss)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's activations in "
                   "backward instead of keeping them (less memory, about a third more compute)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the frozen base model's weights and "
                   "activations (the adapter always trains in fp32); bf16 halves the model's memory and is 2-3x faster "
                   "where bf16 is native (AVX512-BF16, AMX, GPUs)")
    p.add_argument("--threads", type=int)


def run(args: argparse.Namespace) -> int:
    import qwenkit
    from qwenkit.tune import distributed
    from qwenkit.tune.data import load_examples
    from qwenkit.tune.lora import LoRAConfig, apply_lora
    from qwenkit.tune.train import TrainConfig, Trainer

    lora = LoRAConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout,
                      target_modules=[t.strip() for t in args.targets.split(",") if t.strip()])
    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, seed=args.seed,
                      eval_every=args.eval_every, save_every=args.save_every, pack=args.pack)
    dist = distributed.setup()
    distributed.check_batch(args.batch_size, dist)
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = qwenkit.load(args.model, threads=args.threads, quant="none", dtype=dtype)
    train, skipped = load_examples(model, args.data, args.max_len, args.on_bad_example, args.train_on)
    evals = []
    if args.eval:
        evals, eval_skipped = load_examples(model, args.eval, args.max_len, args.on_bad_example, args.train_on)
        skipped += eval_skipped
    main = dist is None or dist.main
    for s in skipped if main else []:
        print(f"qwenkit: skipped: {s.reason}", file=sys.stderr)
    apply_lora(model.model, lora, seed=args.seed)
    model.model.gradient_checkpointing = args.gradient_checkpointing
    if dist is not None:
        distributed.shard(model.model, dist)
    trainer = Trainer(model.model, lora, cfg, train, evals, args.out, base_model=args.model, dist=dist)
    if main:  # the run's length up front: --max-steps sets it, --epochs only without it
        print(f"{len(train)} training examples" + (f", {len(evals)} eval examples" if evals else "")
              + (f", {dist.world} processes (FSDP)" if dist else "")
              + f"; {trainer.total_steps} optimizer steps ({trainer.epochs:.3g} epochs)", file=sys.stderr)
    summary = trainer.run(resume=args.resume, progress=sys.stderr.isatty())
    distributed.finish(dist)
    if main:
        print(json.dumps(summary))
    return 0
