"""GGUF models split by llama.cpp's gguf-split into NAME-00001-of-0000N.gguf files, read as one checkpoint.

The first shard carries the metadata (tokenizer, template, hyper-parameters); every shard carries some tensors.
Opening the first shard of a split model opens them all; tensors are then served by whichever file holds them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from qwenkit.checkpoint.gguf import GGUFFile, GGUFTensor
from qwenkit.errors import BadCheckpoint

SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFShards:
    def __init__(self, first: GGUFFile):
        count = first.metadata.get("split.count")
        name = Path(first.path).name
        m = SHARD_NAME.match(name)
        if not isinstance(count, int) or count < 2 or not m or int(m["count"]) != count:
            raise BadCheckpoint(f"{first.path}: split GGUF whose name does not follow NAME-00001-of-{count}.gguf")
        if int(m["no"]) != 1:
            raise BadCheckpoint(f"{first.path}: shard {int(m['no'])} of a split GGUF; open the first shard instead")
        self.path = first.path
        self.metadata = first.metadata
        self.files = [first]
        for i in range(2, count + 1):
            shard = Path(first.path).with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf")
            if not shard.exists():
                raise BadCheckpoint(f"{first.path}: split GGUF shard {shard.name} is missing")
            self.files.append(GGUFFile(shard))
        self.tensors: dict[str, GGUFTensor] = {}
        self._owner: dict[str, GGUFFile] = {}
        for f in self.files:
            for tensor_name, tensor in f.tensors.items():
                if tensor_name in self.tensors:
                    raise BadCheckpoint(f"{f.path}: tensor {tensor_name} also appears in {self._owner[tensor_name].path}")
                self.tensors[tensor_name] = tensor
                self._owner[tensor_name] = f

    @property
    def architecture(self) -> str:
        return self.files[0].architecture

    def raw(self, name: str) -> np.ndarray:
        return self._owner[name].raw(name)

    def dequantize(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._owner[name].dequantize(name, out=out)

    def release(self, name: str) -> None:
        self._owner[name].release(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def open_gguf(path: Path) -> GGUFFile | GGUFShards:
    """A GGUF checkpoint: the file itself, or all shards when it is the first shard of a split model."""
    first = GGUFFile(path)
    count = first.metadata.get("split.count", 1)
    if isinstance(count, int) and count > 1:
        return GGUFShards(first)
    return first
