"""How long a tuning run is: `max_steps` sets it, repeating epochs as needed (transformers' Trainer does the same),
and the epochs set it only without one."""

from __future__ import annotations

import pytest

from qwenkit.tune.data import Example
from qwenkit.tune.lora import LoRAConfig, apply_lora
from qwenkit.tune.train import TrainConfig, Trainer, micro_batches
from tests.tiny_checkpoint import tiny_model


@pytest.fixture(scope="module")
def adapted():
    model = tiny_model("qwen2")
    apply_lora(model, LoRAConfig(r=2), seed=0)
    return model


def trainer(model, tmp_path, n: int, **cfg) -> Trainer:
    examples = [Example([1, 2, 3], [1, 2, 3], line=i + 1) for i in range(n)]
    return Trainer(model, LoRAConfig(r=2), TrainConfig(**cfg), examples, None, tmp_path)


def test_max_steps_beyond_one_epoch_repeats_the_epochs(adapted, tmp_path):
    run = trainer(adapted, tmp_path, 40, batch_size=4, max_steps=30)  # 10 steps an epoch
    assert run.total_steps == 30
    one_epoch = micro_batches(40, TrainConfig(batch_size=4))
    assert run.batches[:10] == one_epoch  # the first epoch is the one-epoch run's
    for epoch in (1, 2):  # each later one is every example again, in its own seeded order
        again = run.batches[10 * epoch:10 * (epoch + 1)]
        assert sorted(i for b in again for i in b) == list(range(40)) and again != one_epoch


@pytest.mark.parametrize("n, cfg, steps", [
    (40, {"batch_size": 4, "epochs": 5, "max_steps": 7}, 7),  # a shorter max_steps stops early
    (40, {"batch_size": 4, "grad_accum": 2, "max_steps": 12}, 12),  # steps of two micro-batches, across epochs
    (40, {"batch_size": 4, "grad_accum": 3, "epochs": 2}, 7),  # no max_steps: 20 micro-batches, the last step short
    (3, {"batch_size": 4, "max_steps": 5}, 5),  # fewer examples than a batch
])
def test_the_run_length(adapted, tmp_path, n, cfg, steps):
    run = trainer(adapted, tmp_path, n, **cfg)
    assert run.total_steps == steps
    assert len(run.batches) >= (steps - 1) * run.cfg.grad_accum + 1  # every step has its micro-batches
