"""Write one of our models to a GGUF file with llama.cpp's own writer (the `gguf` package), as llama.cpp's
convert_hf_to_gguf.py lays it out: tensor names, metadata keys, gate/up experts split. Test fixture only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenkit.checkpoint.names import hf_to_gguf
from qwenkit.model.config import GGUF_ARCHITECTURES

ARCH_OF = {v: k for k, v in GGUF_ARCHITECTURES.items()}


def write_gguf(model, path: Path, qtype=None, tokenizer_meta: dict | None = None, split_max_tensors: int = 0) -> Path:
    """Returns the path written (the first shard's when split_max_tensors splits the model)."""
    import gguf

    c = model.config
    arch = ARCH_OF[c.model_type]
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(c.rope_scaling["original_max_position_embeddings"])
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if c.has_shared_expert:
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    for key, value in (tokenizer_meta or {}).items():
        w.add_key_value(key, value[0], value[1])
    for name, param in model.state_dict().items():
        array = param.detach().float().numpy()
        names = hf_to_gguf(name)
        parts = np.split(array, len(names), axis=1) if len(names) > 1 else [array]
        for gguf_name, part in zip(names, parts):
            if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
                part = part.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
            part = np.ascontiguousarray(part)
            if qtype is None or part.ndim == 1 or part.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                w.add_tensor(gguf_name, part)
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(part, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(path))[0]
