"""The LoRA training loop: seeded, with gradient accumulation, eval loss, checkpoints and exact resume.

One optimizer step consumes `grad_accum` micro-batches of `batch_size` examples. The order of examples is a seeded
permutation per epoch, and the learning rate a pure function of the step (linear warmup, then linear decay to
zero), so a run resumed from a checkpoint (adapter, AdamW moments, RNG state, step) continues exactly as the
uninterrupted run would have. Examples in a micro-batch are right-padded: with causal attention, padding after a
sequence cannot change it, and its labels carry no loss. With `pack`, they go end to end in one row instead, each
attending only to itself, so no padding is computed at all.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwenkit.tune.data import IGNORE, Example
from qwenkit.tune.lora import LoRAConfig, save_adapter

CHECKPOINTS_KEPT = 2


@dataclass
class TrainConfig:
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # the run's length in optimizer steps, repeating epochs as needed (overrides epochs)
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    pack: bool = False  # each micro-batch in one row, attention kept inside each example


def batches_per_epoch(n_examples: int, cfg: TrainConfig) -> int:
    """Micro-batches in one pass over the examples (the last one may be short)."""
    return math.ceil(n_examples / cfg.batch_size)


def micro_batches(n_examples: int, cfg: TrainConfig) -> list[list[int]]:
    """Example indices of every micro-batch of the whole run, in order. With max_steps, as many epochs as its steps
    need (transformers' Trainer does the same): the last may be cut short."""
    epochs = cfg.epochs
    if cfg.max_steps:
        epochs = math.ceil(cfg.max_steps * cfg.grad_accum / batches_per_epoch(n_examples, cfg))
    out = []
    for epoch in range(epochs):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        out += [order[i:i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
    return out


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def collate_packed(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The examples end to end in one row, with the segment id of every token. Each example's first label is
    dropped: it would be the target of the previous example's last token (unpacked, nothing predicts it either)."""
    ids = torch.tensor([t for e in examples for t in e.input_ids])[None]
    labels = torch.tensor([lab if i else IGNORE for e in examples for i, lab in enumerate(e.labels)])[None]
    segments = torch.tensor([n for n, e in enumerate(examples) for _ in e.input_ids])[None]
    return ids, labels, segments


def summed_loss(model: torch.nn.Module, examples: list[Example], pack: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of the next-token losses over every labelled token, and how many there were. The vocabulary projection
    runs only on the positions that have a label: with loss on assistant turns, most of a chat (system prompt,
    user turns) needs none, and that projection is a quarter of a 0.5B model's work. pack: the examples in one row
    with attention kept inside each (no padding computed); the loss is the padded batch's, up to float order."""
    if pack:
        ids, labels, segments = collate_packed(examples)
        hidden = model(ids, logits="none", segments=segments)
    else:
        ids, labels = collate(examples)
        hidden = model(ids, logits="none")  # final-normed hidden states
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.head(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], batch_size: int, pack: bool = False) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = summed_loss(model, examples[i:i + batch_size], pack)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


class Trainer:
    def __init__(self, model: torch.nn.Module, lora: LoRAConfig, cfg: TrainConfig, train: list[Example],
                 eval_examples: list[Example] | None, out: str | Path, base_model: str | None = None,
                 dist: Any = None):
        """dist: a qwenkit.tune.distributed.Dist when torchrun started several processes (the model sharded)."""
        self.model, self.lora, self.cfg, self.dist = model, lora, cfg, dist
        self.main = dist is None or dist.main
        self.train_examples, self.eval_examples = train, eval_examples or []
        self.out, self.base_model = Path(out), base_model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.batches = micro_batches(len(train), cfg)
        self.total_steps = cfg.max_steps or math.ceil(len(self.batches) / cfg.grad_accum)
        self.step = 0
        self.log: list[dict[str, Any]] = []

    @property
    def epochs(self) -> float:
        """How many passes over the training examples the run makes (a fraction where max_steps ends mid-epoch)."""
        per_epoch = batches_per_epoch(len(self.train_examples), self.cfg)
        return min(self.total_steps * self.cfg.grad_accum, len(self.batches)) / per_epoch

    def lr_at(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        rest = max(self.total_steps - self.cfg.warmup_steps, 1)
        return self.cfg.lr * max(0.0, 1 - (step - self.cfg.warmup_steps) / rest)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        if resume:
            self._resume()
        else:
            torch.manual_seed(self.cfg.seed)
        self.model.train()
        first_eval = self._eval_entry() if self.step == 0 and self.eval_examples else None
        progress = progress and self.main
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not progress, unit="step", desc="tune")
        tokens, started, first_step = 0, time.monotonic(), self.step
        while self.step < self.total_steps:
            chunk = self.batches[self.step * self.cfg.grad_accum:(self.step + 1) * self.cfg.grad_accum]
            groups = [[self.train_examples[i] for i in b] for b in chunk]
            labelled = sum(sum(1 for lab in e.labels[1:] if lab != IGNORE) for g in groups for e in g)
            world = self.dist.world if self.dist else 1
            self.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for group in groups:  # accumulate: each micro-batch's share of the step's mean token loss
                tokens += sum(len(e.input_ids) for e in group)
                weight = 1.0
                if self.dist:  # this rank's part of the micro-batch; FSDP averages gradients over the ranks
                    share = group[self.dist.rank::world]
                    # Fewer examples than processes: a rank with none still joins FSDP's collective forward and
                    # backward, on an example it weighs at zero.
                    group, weight = (share, 1.0) if share else (group[:1], 0.0)
                loss, _ = summed_loss(self.model, group, self.cfg.pack)
                loss = loss * weight
                (loss / max(labelled, 1) * world).backward()
                total += loss.detach()
            if self.dist:
                import torch.distributed as dist

                dist.all_reduce(total)
            total = total.item()
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.optimizer.step()
            self.step += 1
            entry = {"step": self.step, "loss": round(total / max(labelled, 1), 5), "lr": self.lr_at(self.step - 1)}
            self.log.append(entry)
            speed = tokens / max(time.monotonic() - started, 1e-9)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if self.main and not progress and (self.step % max(1, self.total_steps // 20) == 0
                                               or self.step == self.total_steps):
                # no terminal (a log file, CI): a line every 5% instead of the bar
                left = (time.monotonic() - started) / max(self.step - first_step, 1) * (self.total_steps - self.step)
                print(f"step {self.step}/{self.total_steps} loss {entry['loss']:.4f} {speed:.0f} tok/s "
                      f"eta {left:.0f} s", file=sys.stderr, flush=True)
            if self.eval_examples and (self.step % self.cfg.eval_every == 0 or self.step == self.total_steps):
                loss = self._eval_entry()["eval_loss"]  # every rank evaluates (FSDP's forward is collective)
                if self.main:
                    bar.write(f"step {self.step}: eval loss {loss:.4f}", file=sys.stderr)
            if self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                self._checkpoint()
        bar.close()
        save_adapter(self.model, self.lora, self.out, self.base_model, write=self.main)
        if self.main:
            (self.out / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.log))
        evals = [e for e in self.log if "eval_loss" in e]
        losses = [e["loss"] for e in self.log if "loss" in e]
        return {"steps": self.step, "train_tokens_per_s": round(tokens / max(time.monotonic() - started, 1e-9), 1),
                "first_eval_loss": (first_eval or (evals[0] if evals else {})).get("eval_loss"),
                "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
                "final_train_loss": losses[-1] if losses else None}

    def _eval_entry(self) -> dict[str, Any]:
        entry = {"step": self.step, "eval_loss": round(evaluate(self.model, self.eval_examples,
                                                                self.cfg.batch_size, self.cfg.pack), 5)}
        self.log.append(entry)
        return entry

    # ---- checkpoints (qwenkit.tune.checkpoint: no pickle, the same with one process or several) -------------
    def _checkpoint(self) -> Path:
        from qwenkit.tune import checkpoint

        final = checkpoint.write(self.out / f"checkpoint-{self.step}", self.model, self.optimizer, self.lora,
                                 self.base_model, {"step": self.step, "log": self.log, **self._settings()}, self.dist)
        if self.main:
            for old in sorted(self._checkpoints())[:-CHECKPOINTS_KEPT]:
                shutil.rmtree(old[1], ignore_errors=True)
        return final

    def _settings(self) -> dict[str, Any]:
        frozen = next((p.dtype for p in self.model.parameters() if not p.requires_grad), torch.float32)
        return {"train": asdict(self.cfg), "lora": asdict(self.lora), "base_dtype": str(frozen).removeprefix("torch.")}

    def _checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.out.glob("checkpoint-*"):
            if p.is_dir() and (p / "trainer_state.json").exists() and p.name.split("-")[-1].isdigit():
                found.append((int(p.name.split("-")[-1]), p))
        return found

    def _resume(self) -> None:
        from qwenkit.errors import BadCheckpoint
        from qwenkit.tune import checkpoint

        found = self._checkpoints()
        if not found:
            raise BadCheckpoint(f"{self.out}: no checkpoint to resume from")
        _, path = max(found)
        state = checkpoint.read(path, self.model, self.optimizer, self._settings(), self.dist)
        self.step, self.log = state["step"], state["log"]
