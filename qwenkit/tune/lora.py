"""LoRA on the native model, with PEFT's math and PEFT's file format.

    cfg = LoRAConfig(r=16, alpha=32)
    apply_lora(model, cfg)                      # freezes the base, wraps q/k/v/o and gate/up/down projections
    ... train model (only lora_A / lora_B require grad) ...
    save_adapter(model, cfg, "out/", base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct")
    load_adapter(other_model, "out/")           # or peft.PeftModel.from_pretrained(transformers_model, "out/")
    merge_lora(model)                           # W += B A * scaling; plain nn.Linear layers again

(qwenkit.tune.merge folds whole PEFT adapters into the weights, those on lm_head and embed_tokens included.)

The math is PEFT's: y = W x + B(A(dropout(x))) * alpha / r (alpha / sqrt(r) with rslora), A initialised
Kaiming-uniform (a = sqrt 5) and B zero, so a fresh adapter changes nothing. Module paths are the Hugging Face
names our model keeps, so adapter keys read `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
exactly what PEFT writes and loads. MoE experts are stacked tensors, not Linear layers: they are not targeted (PEFT
on transformers' MoE models targets the same attention and dense/shared-expert projections by these names).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.errors import BadCheckpoint, BadRequest

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's wrapper path in front of the model's own module names


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise BadRequest(f"LoRA rank r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadRequest(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        # The adapter trains in fp32 over a bf16/fp16 base (PEFT's autocast_adapter_dtype): its updates are small.
        dtype = torch.float32 if base.weight.dtype in (torch.bfloat16, torch.float16) else base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, dtype=dtype)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.scaling = cfg.scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT scales B's output; scaling the rank-r intermediate instead is the same product with r columns to
        # multiply instead of out_features (7% of a training step's time on the 0.5B model, measured).
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype != x.dtype:
            # A bf16 base: the small adapter matrices go to bf16 for the products (autocast's way), rather than
            # every activation to fp32 and back; their fp32 copies still get the gradients.
            a, b = a.to(x.dtype), b.to(x.dtype)
        return self.base(x) + F.linear(F.linear(self.dropout(x), a) * self.scaling, b)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling).to(
                self.base.weight.dtype)
        return self.base


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update B A * scaling that an adapter pair adds to a Linear weight [out, in] (A [r, in], B [out, r])."""
    return (b @ a) * scaling


def target_paths(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The Linear layers `cfg` adapts. Never lm_head: the serving engine cannot apply an adapter to it per request,
    and in a tied model it is the embedding table (qwenkit.tune.merge folds a PEFT adapter on it into the weights)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in cfg.target_modules and name != "lm_head"]


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None) -> list[str]:
    """Freeze every weight and wrap the target Linear layers; returns their module paths. seed: the generator for
    lora_A's initialisation (the same seed gives the same adapter)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise BadRequest("the model already has LoRA layers (merge them or load a fresh model)")
    if any(getattr(m, "qkv_proj", None) is not None for m in model.modules()):  # fused, so quantized
        raise BadRequest("LoRA needs the float model: load it with quant='none'")
    paths = target_paths(model, cfg)
    if not paths:
        raise BadRequest(f"no Linear layer of the model is named one of {cfg.target_modules}")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for path in paths:
        _set(model, path, LoRALinear(model.get_submodule(path), cfg, generator))
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys."""
    from qwenkit.tune.distributed import full

    out = {}
    for path, m in lora_layers(model).items():  # under FSDP every rank gathers, so every rank must call this
        out[f"{PREFIX}{path}.lora_A.weight"] = full(m.lora_A.weight.detach()).contiguous()
        out[f"{PREFIX}{path}.lora_B.weight"] = full(m.lora_B.weight.detach()).contiguous()
    return out


def save_adapter(model: nn.Module, cfg: LoRAConfig, folder: str | Path, base_model: str | None = None,
                 write: bool = True) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained. Under FSDP
    every rank calls this (to gather the tensors) and only the one with write=True writes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = adapter_state_dict(model)
    if not write:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if not tensors:
        raise BadRequest("the model has no LoRA layers to save")
    targets = sorted({p.rsplit(".", 1)[-1] for p in lora_layers(model)})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
        "use_rslora": cfg.rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    partial = folder / (ADAPTER_WEIGHTS + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.replace(folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadCheckpoint(f"{path}: cannot read the adapter config: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise BadCheckpoint(f"{path}: peft_type must be LORA, got {raw.get('peft_type') if isinstance(raw, dict) else raw!r}")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(key):
            raise BadCheckpoint(f"{path}: {key} is not supported yet")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise BadCheckpoint(f"{path}: target_modules must be a list of module names, got {targets!r}")
    try:
        return LoRAConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
                          target_modules=targets, rslora=bool(raw.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise BadCheckpoint(f"{path}: bad or missing field: {e}") from None


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Wrap `model` with the adapter in `folder` (ours or PEFT's): every tensor must match a layer, and every layer
    must get its tensors. This changes the network in place: a qwenkit.runtime.Model that already generated keeps
    the base model's keys in its engine's prefix cache, so start a fresh engine (Model.start_engine()) after it."""
    cfg = read_adapter_config(folder)
    apply_lora(model, cfg)
    copy_adapter_weights(model, *read_adapter_weights(folder))
    return cfg


def read_adapter_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of the adapter in `folder`, and the file they came from (for errors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(folder) / ADAPTER_WEIGHTS
    try:
        return load_file(str(weights)), weights
    except (OSError, SafetensorError) as e:
        raise BadCheckpoint(f"{weights}: cannot read the adapter weights: {e}") from None


def copy_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """Copy adapter tensors (read from the file `weights`) into the model's LoRA layers (already in place),
    checking that the two match one to one, shapes included."""
    expected = {}
    for path, m in lora_layers(model).items():
        expected[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
        expected[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise BadCheckpoint(f"{weights}: the adapter does not fit this model: "
                            + (f"unknown tensors {unknown[:3]}" if unknown else f"missing tensors {missing[:3]}"))
    with torch.no_grad():
        for key, param in expected.items():
            t = tensors[key]
            if t.shape != param.shape:
                raise BadCheckpoint(f"{weights}: {key} has shape {tuple(t.shape)}, the model needs "
                                    f"{tuple(param.shape)}")
            param.copy_(t.to(param.dtype))


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, leaving plain Linear layers."""
    for path, m in lora_layers(model).items():
        _set(model, path, m.merged())
