"""`qwenkit merge BASE ADAPTER --out DIR`: the base model with the adapter folded into its weights, as a Hugging Face
safetensors folder (config, generation config and tokenizer files copied from the base), loadable by transformers
and by qwenkit. Mixture-of-experts models are written with one tensor per expert, as their releases are."""

from __future__ import annotations

import shutil
from pathlib import Path

from qwenkit.errors import BadRequest

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def merge_to_folder(base: Path, adapter: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    from qwenkit.checkpoint.loader import load_weights
    from qwenkit.checkpoint.names import hf_tensors
    from qwenkit.tune.lora import merge_adapter

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
    return out
