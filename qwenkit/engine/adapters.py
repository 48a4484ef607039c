"""LoRA adapters at serving time: several named adapters over one base model, chosen per request, in one batch.

    adapters = AdapterSet(model)                 # the loaded (possibly quantized, fused) network
    ident = adapters.add("support", "out/")      # a PEFT-format folder (qwenkit tune's or peft's); returns its id
    with adapters.rows(torch.tensor([0, ident, ident, 0])):   # adapter id of every flat row; 0 = the base model
        logits = model(...)

The base weights stay as they are (int8, int4 or fp32; q/k/v and gate/up possibly fused): each targeted module
is wrapped once, and adds, for the rows of each adapter, the adapter's low-rank update B(A x) * alpha / r to the
slice of the output that projection owns (q, k or v of a fused qkv_proj). An adapter's q/k/v (or gate/up) A
matrices are stacked, so one product serves all its slices. The products are batched matmuls with one row per
batch entry, so a row's numbers do not depend on how many other rows share the step (the serving engine's promise:
batching changes no result).

Outside `rows(...)`, or for rows of id 0, the wrapped modules compute exactly the base model.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwenkit._scoped import scoped
from qwenkit.errors import BadCheckpoint, BadRequest
from qwenkit.model.attention import Packed

PREFIX = "base_model.model."

_active = threading.local()


def active_rows() -> torch.Tensor | int | None:
    return getattr(_active, "rows", None)


@dataclass
class _Part:
    start: int  # output columns [start, end) of the wrapped module
    end: int
    rank: tuple[int, int]  # columns of the stacked intermediate
    B: torch.Tensor  # [end - start, r]


@dataclass
class _Update:
    A: torch.Tensor  # [sum of ranks, in_features]: every part's A stacked
    parts: list[_Part]
    scaling: float


class AdaptedLinear(nn.Module):
    """A base projection plus, per adapter id, a low-rank update of some of its output columns."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.updates: dict[int, _Update] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = active_rows()
        if rows is None or not self.updates:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if isinstance(rows, int):  # one adapter for every row (a forward pass of one sequence)
            if rows in self.updates:
                self._add(flat_x, flat_y, None, self.updates[rows])
            return flat_y.view(y.shape)
        if rows.numel() != flat_x.shape[0]:
            raise RuntimeError(f"adapter rows: {rows.numel()} ids for {flat_x.shape[0]} activation rows")
        for ident, update in self.updates.items():
            index = (rows == ident).nonzero().flatten()
            if index.numel():
                self._add(flat_x, flat_y, index, update)
        return flat_y.view(y.shape)

    @staticmethod
    def _add(flat_x: torch.Tensor, flat_y: torch.Tensor, index: torch.Tensor | None, update: _Update) -> None:
        """flat_y[index] += the update's low-rank product of flat_x[index] (all rows when index is None)."""
        xs = (flat_x if index is None else flat_x.index_select(0, index)).to(update.A.dtype)
        n = xs.shape[0]
        h = torch.bmm(xs[:, None, :], update.A.t().expand(n, -1, -1))[:, 0] * update.scaling
        for part in update.parts:
            delta = torch.bmm(h[:, None, part.rank[0]:part.rank[1]], part.B.t().expand(n, -1, -1))[:, 0]
            if index is None:
                flat_y[:, part.start:part.end] += delta.to(flat_y.dtype)
            else:
                flat_y[index, part.start:part.end] += delta.to(flat_y.dtype)


class AdapterSet:
    def __init__(self, model: nn.Module):
        self.model = model
        self.names: dict[str, int] = {}
        self.folders: dict[str, Path] = {}

    @staticmethod
    def rows(ids: torch.Tensor | int | None) -> AbstractContextManager[None]:
        """The adapter id of every flat activation row for the forward passes in this block (this thread); an int:
        the same adapter for every row."""
        if isinstance(ids, int):
            return scoped(_active, "rows", ids or None)
        return scoped(_active, "rows", ids if ids is not None and bool((ids != 0).any()) else None)

    def id_of(self, name: str | None) -> int:
        if name is None:
            return 0
        try:
            return self.names[name]
        except KeyError:
            raise BadRequest(f"no adapter named {name!r}; loaded: {', '.join(self.names) or 'none'}") from None

    def add(self, name: str, folder: str | Path) -> int:
        """Load a PEFT LoRA folder under `name`; returns its row id. Every tensor must fit a module of the model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from qwenkit.tune.lora import ADAPTER_WEIGHTS, read_adapter_config

        if name in self.names:
            raise BadRequest(f"adapter {name!r} is already loaded")
        folder = Path(folder)
        cfg = read_adapter_config(folder)
        weights = folder / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(weights))
        except (OSError, SafetensorError) as e:
            raise BadCheckpoint(f"{weights}: cannot read the adapter weights: {e}") from None
        pairs = self._pairs(tensors, weights)
        grouped: dict[str, list] = {}
        for path, (a, b) in pairs.items():
            module_path, part, splits = self._locate(path, weights)
            grouped.setdefault(module_path, []).append((part, splits, a, b))
        dtype = getattr(self.model, "dtype", torch.float32)
        planned = []  # everything is checked before any module is touched: a bad adapter changes nothing
        for module_path, items in grouped.items():
            splits, in_features = items[0][1], self._in_features(module_path)
            offsets = [sum(splits[:i]) for i in range(len(splits) + 1)]
            stacked, parts, r0 = [], [], 0
            for part, _, a, b in sorted(items, key=lambda item: item[0]):
                start, end = offsets[part], offsets[part + 1]
                if a.shape[0] != cfg.r:  # the scaling is alpha / r: another rank would be served wrongly scaled
                    raise BadCheckpoint(f"{weights}: {module_path} part {part}: lora_A has rank {a.shape[0]} but "
                                        f"adapter_config.json says r={cfg.r}")
                if a.shape[1] != in_features or b.shape[0] != end - start or a.shape[0] != b.shape[1]:
                    raise BadCheckpoint(f"{weights}: {module_path} part {part}: lora_A {tuple(a.shape)} and lora_B "
                                        f"{tuple(b.shape)} do not fit a {in_features} -> {end - start} projection")
                stacked.append(a.to(dtype))
                parts.append(_Part(start, end, (r0, r0 + a.shape[0]), b.to(dtype).contiguous()))
                r0 += a.shape[0]
            planned.append((module_path, _Update(torch.cat(stacked).contiguous(), parts, cfg.scaling)))
        ident = len(self.names) + 1
        for module_path, update in planned:
            self._wrap(module_path).updates[ident] = update
        self.names[name], self.folders[name] = ident, folder
        return ident

    # ---- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _pairs(tensors: dict[str, torch.Tensor], weights: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise BadCheckpoint(f"{weights}: unexpected tensor {key!r} (only LoRA A/B weights are served)")
            path, which = key[len(PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            pairs.setdefault(path, {})[which] = t
        out = {}
        for path, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise BadCheckpoint(f"{weights}: {path} has {sorted(pair)} but needs lora_A and lora_B")
            out[path] = (pair["lora_A"], pair["lora_B"])
        if not out:
            raise BadCheckpoint(f"{weights}: no LoRA tensors")
        return out

    def _locate(self, path: str, weights: Path) -> tuple[str, int, tuple[int, ...]]:
        """(module to wrap, part index, output sizes of its parts) for an adapter target like
        `model.layers.3.self_attn.q_proj`, following the fusion the loaded model uses."""
        parent, _, leaf = path.rpartition(".")
        if leaf in ("lm_head", "embed_tokens"):
            # The engine runs the head on the sampled rows only and the embedding is a lookup: neither takes a
            # per-row update. `qwenkit merge` folds such an adapter into the weights instead.
            raise BadCheckpoint(f"{weights}: {path}: adapters on {leaf} cannot be served per request; merge the "
                                "adapter into the model (qwenkit merge) and serve that")
        try:
            owner = self.model.get_submodule(parent)
        except AttributeError:
            raise BadCheckpoint(f"{weights}: {path} is not a module of this model") from None
        joined = owner.packed_part(leaf) if isinstance(owner, Packed) else None
        if joined is not None:
            return f"{parent}.{joined[0]}", joined[1], tuple(owner.split)
        target = getattr(owner, leaf, None)
        if target is None or not hasattr(target, "out_features"):
            raise BadCheckpoint(f"{weights}: {path} is not a projection of this model")
        return path, 0, (target.out_features,)

    def _wrap(self, module_path: str) -> AdaptedLinear:
        parent, _, leaf = module_path.rpartition(".")
        owner = self.model.get_submodule(parent)
        current = getattr(owner, leaf)
        if isinstance(current, AdaptedLinear):
            return current
        wrapper = AdaptedLinear(current)
        setattr(owner, leaf, wrapper)
        return wrapper

    def _in_features(self, module_path: str) -> int:
        return self.model.get_submodule(module_path).in_features
