"""Training across processes with PyTorch FSDP (fully_shard), when started by torchrun.

    torchrun --nproc_per_node 2 -m qwenkit tune MODEL --data train.jsonl --out adapter/    # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 -m qwenkit tune MODEL ...                                   # 8 GPUs (nccl)

Each decoder layer and the whole model are sharded across the processes (the frozen base too, so each holds 1/N
of it). Every micro-batch is split between the ranks; gradients are averaged by FSDP, so each rank's loss is scaled
by the world size to give the same summed gradient as one process with the whole micro-batch. Rank 0 writes the
adapter, the logs and the checkpoints (qwenkit.tune.checkpoint gathers the sharded optimizer state for it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.errors import BadRequest


@dataclass
class Dist:
    rank: int
    world: int
    mesh: Any

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist | None:
    """Join the process group when torchrun started us (WORLD_SIZE > 1); None for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    return Dist(dist.get_rank(), world, mesh)


def shard(model: torch.nn.Module, d: Dist) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=d.mesh)
    fully_shard(model, mesh=d.mesh)


def check_batch(batch_size: int, d: Dist | None) -> None:
    if d is not None and batch_size % d.world:
        raise BadRequest(f"--batch-size {batch_size} must be a multiple of the {d.world} processes")


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole (a collective: every rank must call it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_rng_states(d: Dist | None) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (its dropout masks), in rank order, on every rank (a collective)."""
    mine = torch.get_rng_state()
    if d is None:
        return [mine]
    import torch.distributed as dist

    states = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(states, mine)
    return states


def barrier(d: Dist | None) -> None:
    if d is not None:
        import torch.distributed as dist

        dist.barrier()


def finish(d: Dist | None) -> None:
    if d is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
