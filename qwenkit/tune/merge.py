"""A PEFT adapter folded into the model's weights, and `qwenkit merge BASE ADAPTER --out DIR`: the merged model as a
Hugging Face safetensors folder (config, generation config and tokenizer files copied from the base), loadable by
transformers and by qwenkit. Mixture-of-experts models are written with one tensor per expert, as their releases are.

What PEFT saves for these models, and how each is folded in (PEFT's merge_and_unload is the reference):
- LoRA on the decoder's Linear layers (`...q_proj.lora_A.weight`, `lora_B.weight`): W += B A * scaling, through
  qwenkit.tune.lora's layers, which check that tensors and layers match one to one.
- LoRA on lm_head, a Linear (`lm_head.lora_A.weight`, `lora_B.weight`): the same update. LoRA on embed_tokens, an
  Embedding, stores A [r, vocab] and B [hidden, r] (`lora_embedding_A`, `lora_embedding_B`), so the update of the
  [vocab, hidden] table is (B A)^T * scaling. With either, PEFT also saves both layers' own weights
  (`...base_layer.weight`); they are loaded first, as PEFT loads them.
- modules_to_save: the module's whole trained weight (`base_model.model.lm_head.weight`), which replaces it.

Tied embeddings (the small Qwen models, Qwen2.5-0.5B among them: lm_head is embed_tokens' table): PEFT adds a LoRA
on either end to the one shared table, so merging a LoRA on lm_head changes the input embeddings too, and the merged
model stays tied (its logits are not the unmerged adapter's). A module in modules_to_save is PEFT's own copy, so
replacing one end unties the two: the merged model gets a separate lm_head and config.json says tie_word_embeddings
false; both ends saved with the same values (PEFT's ensure_weight_tying) stay one table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qwenkit.errors import BadCheckpoint, BadRequest
from qwenkit.tune.lora import (
    PREFIX,
    apply_lora,
    copy_adapter_weights,
    lora_delta,
    merge_lora,
    read_adapter_config,
    read_adapter_weights,
    target_paths,
)

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
BASE_LAYER = ".base_layer."  # PEFT's name for the wrapped layer's own weight
LINEAR_PAIR, EMBEDDING_PAIR = (".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")


def merge_adapter(model: nn.Module, folder: str | Path) -> None:
    """The adapter in `folder` folded into the model's weights (what `qwenkit merge` and `export` write)."""
    cfg = read_adapter_config(folder)
    tensors, weights = read_adapter_weights(folder)
    own, saved, pairs = _outer_tensors(tensors)
    with torch.no_grad():
        for name, t in own.items():  # into the layer's weight, which in a tied model both ends share
            _copy(_parameter(model, name, weights), t, name, weights)
        head, embedding = saved.get(HEAD), saved.get(EMBEDDING)
        one_table = head is not None and embedding is not None and torch.equal(head, embedding)
        if model.lm_head is None and (head is not None or embedding is not None) and not one_table:
            _untie(model)
        for name, t in saved.items():
            _copy(_parameter(model, name, weights), t, name, weights)
        for (path, embedding_pair), pair in pairs.items():
            _fold_pair(model, path, embedding_pair, pair, cfg.scaling, weights)
    if tensors or target_paths(model, cfg):
        apply_lora(model, cfg)
        copy_adapter_weights(model, tensors, weights)
        merge_lora(model)


def _outer_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Take out of `tensors` (PEFT's keys) what is not LoRA on the decoder's Linear layers: the layers' own weights
    and modules_to_save by parameter name, and LoRA pairs ({"A": .., "B": ..}) on lm_head and embed_tokens by
    (module path, whether it is an Embedding's). What stays (or does not fit) is for copy_adapter_weights."""
    own, saved, pairs = {}, {}, {}
    for key in list(tensors):
        name = key.removeprefix(PREFIX)
        if not key.startswith(PREFIX) or (name.endswith(LINEAR_PAIR) and not name.startswith("lm_head.")):
            continue
        if name.endswith(LINEAR_PAIR + EMBEDDING_PAIR):
            stem = name.removesuffix(".weight")  # ends in A or B
            path = stem.rpartition(".")[0]
            pairs.setdefault((path, name.endswith(EMBEDDING_PAIR)), {})[stem[-1]] = tensors.pop(key)
        elif BASE_LAYER in name:
            own[name.replace(BASE_LAYER, ".")] = tensors.pop(key)
        else:
            saved[name] = tensors.pop(key)
    return own, saved, pairs


def _parameter(model: nn.Module, name: str, weights: Path) -> torch.Tensor:
    if name == HEAD and model.lm_head is None:
        return model.model.embed_tokens.weight  # tied: the one table
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise BadCheckpoint(f"{weights}: the adapter does not fit this model: unknown tensor {name!r}") from None


def _copy(param: torch.Tensor, t: torch.Tensor, name: str, weights: Path) -> None:
    if t.shape != param.shape:
        raise BadCheckpoint(f"{weights}: {name} has shape {tuple(t.shape)}, the model needs {tuple(param.shape)}")
    param.copy_(t.to(param.dtype))


def _untie(model: nn.Module) -> None:
    """Give a tied model an lm_head of its own, a copy of the table (what PEFT's merge gives for one end saved)."""
    table = model.model.embed_tokens.weight
    model.lm_head = nn.Linear(table.shape[1], table.shape[0], bias=False, device=table.device, dtype=table.dtype)
    model.lm_head.weight.copy_(table)
    model.lm_head.requires_grad_(False)
    model.config.tie_word_embeddings = False


def _fold_pair(model: nn.Module, path: str, embedding: bool, pair: dict[str, torch.Tensor], scaling: float,
               weights: Path) -> None:
    if set(pair) != {"A", "B"}:
        raise BadCheckpoint(f"{weights}: {path} has LoRA {' and '.join(pair)} only, it needs A and B")
    weight = _parameter(model, f"{path}.weight", weights)
    a, b = pair["A"].float(), pair["B"].float()
    if a.shape[0] != b.shape[1]:
        raise BadCheckpoint(f"{weights}: {path}: LoRA A {tuple(a.shape)} and B {tuple(b.shape)} do not multiply")
    delta = lora_delta(a, b, scaling)
    if embedding:  # A [r, vocab] and B [hidden, r]: B A is the transpose of the [vocab, hidden] table's update
        delta = delta.T
    if delta.shape != weight.shape:
        raise BadCheckpoint(f"{weights}: {path}: LoRA A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its "
                            f"{tuple(weight.shape)} weight")
    weight += delta.to(weight.dtype)


def merge_to_folder(base: Path, adapter: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    from qwenkit.checkpoint.loader import load_weights
    from qwenkit.checkpoint.names import hf_tensors

    if not base.is_dir():
        raise BadRequest(f"{base}: merging needs a Hugging Face folder as the base (a GGUF base: use the folder it "
                         "was converted from)")
    model, config = load_weights(base)
    merge_adapter(model, adapter)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        state.update(hf_tensors(name, tensor.contiguous(), config))  # MoE experts: one tensor per expert again
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    partial = out / "model.safetensors.partial"
    save_file(state, str(partial), metadata={"format": "pt"})
    partial.replace(out / "model.safetensors")
    for name in COPIED:
        if (base / name).exists():
            shutil.copyfile(base / name, out / name)
    raw = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if raw.get("tie_word_embeddings", False) != model.config.tie_word_embeddings:  # the merge untied the head
        raw["tie_word_embeddings"] = model.config.tie_word_embeddings
        (out / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return out
