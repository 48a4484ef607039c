"""Hugging Face safetensors checkpoints: one model.safetensors or shards listed in model.safetensors.index.json.

Tensors are read through the safetensors library's memory map one at a time, so loading never holds a second full
copy of the weights. The index file is untrusted JSON: shard names must stay inside the folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from qwenkit.errors import BadCheckpoint


class SafetensorsFolder:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        single = self.folder / "model.safetensors"
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            shards = self._read_index(index)
        elif single.exists():
            shards = [single]
        else:
            raise BadCheckpoint(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        for shard in shards:
            handle = self._open(shard)
            self._handles[shard] = handle
            for name in handle.keys():
                if name in self._where and self._where[name] != shard:
                    raise BadCheckpoint(f"{shard}: tensor {name} also appears in {self._where[name].name}")
                self._where[name] = shard

    def _read_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadCheckpoint(f"{index}: not a valid safetensors index ({e})") from None
        shards = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise BadCheckpoint(f"{index}: shard name {name!r} must be a plain file name in the folder")
            shard = self.folder / name
            if not shard.exists():
                raise BadCheckpoint(f"{index}: shard {name} is missing")
            shards.append(shard)
        return shards

    @staticmethod
    def _open(shard: Path):
        try:
            return safe_open(str(shard), framework="pt")
        except Exception as e:  # the library raises its own SafetensorError / OSError types
            raise BadCheckpoint(f"{shard}: not a readable safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        shard = self._where[name]
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as e:
            raise BadCheckpoint(f"{shard}: cannot read tensor {name} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def dtype(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()
