"""Training checkpoints: written whole or not at all, never pickled, and the same whether one process trained or
torchrun's FSDP processes did.

    checkpoint-<step>/adapter_config.json, adapter_model.safetensors   the adapter (PEFT format, loadable as is)
    checkpoint-<step>/optimizer.safetensors    AdamW's moments per parameter name, unsharded; each rank's RNG state
    checkpoint-<step>/trainer_state.json       step, log, the settings it was made with, the process count

Under FSDP the optimizer state is sharded across the processes; writing gathers it whole (rank 0 writes), and
reading gives every rank the whole state, which PyTorch's distributed state-dict helpers shard again. Resuming needs
the same settings and the same process count (each rank's share of a micro-batch, and its dropout RNG, depend on
it), and then continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from qwenkit.errors import BadCheckpoint
from qwenkit.tune import distributed
from qwenkit.tune.lora import ADAPTER_WEIGHTS, PREFIX, LoRAConfig, save_adapter

OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def write(final: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: LoRAConfig,
          base_model: str | None, state: dict[str, Any], dist: distributed.Dist | None) -> Path:
    """Write `final` (every rank calls this: gathering is collective); returns it."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    main = dist is None or dist.main
    tmp = final.with_name(f".{final.name}.partial")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, lora, tmp, base_model, write=main)
    optim = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=dist is not None))
    rngs = distributed.gather_rng_states(dist)
    if main:
        tensors = {f"rng.{rank}": rng for rank, rng in enumerate(rngs)}
        for name, values in optim["state"].items():
            for key, value in values.items():
                tensors[f"state.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / OPTIMIZER))
        (tmp / STATE).write_text(json.dumps({**state, "param_groups": optim["param_groups"],
                                             "world": dist.world if dist else 1}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a kill while writing leaves only the .partial folder
    distributed.barrier(dist)
    return final


def read(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, expected: dict[str, Any],
         dist: distributed.Dist | None) -> dict[str, Any]:
    """Load a checkpoint into the model's adapter, the optimizer and this rank's RNG; returns its trainer state.
    `expected` holds the settings (train, lora) the checkpoint must have been made with."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    try:
        state = json.loads((folder / STATE).read_text())
        tensors = load_file(str(folder / OPTIMIZER))
        adapter = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise BadCheckpoint(f"{folder}: unreadable checkpoint ({e})") from None
    changed = _differences(state, expected)
    if changed:
        raise BadCheckpoint(f"{folder}: the checkpoint was made with other training settings ({', '.join(changed)}); "
                            "resume with the same flags (or start a new --out)")
    world = dist.world if dist else 1
    if state.get("world", 1) != world:
        raise BadCheckpoint(f"{folder}: made by {state.get('world', 1)} processes; resume with as many "
                            f"(this run has {world})")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {key[len(PREFIX):]: t for key, t in adapter.items() if key.startswith(PREFIX)}
    if set(weights) != trainable:
        raise BadCheckpoint(f"{folder}: its adapter does not match this run's LoRA layers")
    set_model_state_dict(model, weights, options=_options(strict=False))
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            name, _, kind = key[len("state."):].rpartition(".")
            moments.setdefault(name, {})[kind] = value
    set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": state["param_groups"]},
                             options=_options())
    torch.set_rng_state(tensors[f"rng.{dist.rank if dist else 0}"])
    return state


def _differences(state: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The settings (as `train.lr`, `base_dtype`) in which a checkpoint's state differs from this run's."""
    out = []
    for key, want in expected.items():
        have = state.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            out += [f"{key}.{k}" for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
        elif have != want:
            out.append(key)
    return out
