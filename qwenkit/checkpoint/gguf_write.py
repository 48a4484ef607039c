"""Write one of our models to a GGUF file with llama.cpp's own writer (the `gguf` package), as llama.cpp's
convert_hf_to_gguf.py lays it out: tensor names, metadata keys, gate/up experts split, tokenizer.* keys.

Used by `qwenkit export --gguf` (a tuned model for llama.cpp, ollama or qwenkit) and by the tests' fixtures.
A vision-language model's decoder is written as llama.cpp's qwen2vl / qwen3vl language model (M-RoPE sections,
DeepStack layer count); its vision tower goes to a separate mmproj file (qwenkit.checkpoint.mmproj.write_mmproj).
Types: F32; F16 (the matrices in half precision, norms and biases kept in F32, as llama.cpp's converter does);
Q8_0 and the other gguf.quants types for matrices whose rows are whole blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenkit.checkpoint.names import hf_to_gguf
from qwenkit.errors import UnsupportedModel
from qwenkit.model.config import GGUF_ARCHITECTURES, GGUF_INTERLEAVED_MROPE, GGUF_VL_ARCHITECTURES

ARCH_OF = {v: k for k, v in GGUF_ARCHITECTURES.items()}
VL_ARCH_OF = {v: k for k, v in GGUF_VL_ARCHITECTURES.items()}


def gguf_architecture(config) -> str:
    """general.architecture for a model config: a decoder with multimodal rotary positions is a VL model's."""
    if config.mrope_section is None:
        return ARCH_OF[config.model_type]
    arch = VL_ARCH_OF.get(config.model_type)
    if arch is None or GGUF_INTERLEAVED_MROPE[arch] != config.mrope_interleaved:
        raise UnsupportedModel(f"llama.cpp has no vision-language architecture for a {config.model_type} decoder "
                               f"with {'interleaved' if config.mrope_interleaved else 'sectioned'} M-RoPE")
    return arch


def write_gguf(model, path: Path, qtype=None, tokenizer_meta: dict | None = None, split_max_tensors: int = 0,
               progress: bool = False) -> Path:
    """Returns the path written (the first shard's when split_max_tensors splits the model). qtype: a
    gguf.GGMLQuantizationType for the matrices (None: F32); tokenizer_meta: {key: (value, GGUFValueType)}."""
    import gguf

    c = model.config
    arch = gguf_architecture(c)
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
    if c.mrope_section is not None:
        # llama.cpp reads four sections (t, h, w and a fourth for other models), as its converter pads them.
        w.add_rope_dimension_sections([*c.mrope_section, 0])
        if arch == "qwen3vl" and c.vision is not None:
            # llama.cpp widens the decoder's input by this many DeepStack feature blocks; without a tower (a
            # text-only load) the count is unknown and the key is left out (llama.cpp's default is 0).
            w.add_num_deepstack_layers(len(c.vision.deepstack_visual_indexes))
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if c.has_shared_expert:
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    for key, value in (tokenizer_meta or {}).items():
        w.add_key_value(key, value[0], value[1])
    from tqdm import tqdm

    decoder = {n: t for n, t in model.state_dict().items() if not n.startswith("visual.")}  # the tower: mmproj
    for name, param in tqdm(decoder.items(), desc="tensors", unit="tensor", disable=not progress):
        array = param.detach().float().numpy()
        names = hf_to_gguf(name)
        parts = np.split(array, len(names), axis=1) if len(names) > 1 else [array]
        for gguf_name, part in zip(names, parts):
            if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
                part = part.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
            part = np.ascontiguousarray(part)
            if qtype is None or part.ndim == 1 or part.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                w.add_tensor(gguf_name, part)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gguf_name, part.astype(np.float16))
            else:
                w.add_tensor(gguf_name, gguf.quants.quantize(part, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(path))[0]


def tokenizer_metadata_from_gguf(source) -> dict:
    """The tokenizer.* keys of an open GGUFFile (qwenkit.checkpoint.gguf), with their types, to copy as they are."""
    import gguf

    out = {}
    for key, value in source.metadata.items():
        if key.startswith("tokenizer."):
            kind = source.metadata_types[key]
            out[key] = (value, gguf.GGUFValueType.ARRAY if isinstance(kind, tuple) else gguf.GGUFValueType(int(kind)))
    return out


def tokenizer_metadata_from_hf(folder: Path, vocab_size: int) -> dict:
    """tokenizer.* keys from a Hugging Face folder's tokenizer.json and tokenizer_config.json, as llama.cpp's
    converter writes them for Qwen2: byte-level BPE tokens padded to the embedding's rows with [PADn] (unused), added
    special tokens as control tokens, merges, end/padding ids and the chat template."""
    import json

    import gguf

    from qwenkit.errors import BadCheckpoint

    try:
        raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (folder / "tokenizer_config.json").exists() else {}
        vocab, merges = raw["model"]["vocab"], raw["model"]["merges"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadCheckpoint(f"{folder}: cannot read the tokenizer for the GGUF file: {e}") from None
    by_id = {i: t for t, i in vocab.items()}
    kinds = {}
    for added in raw.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens, types = [], []
    for i in range(max(vocab_size, max(by_id) + 1)):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(kinds.get(i, gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    ids = {t: i for i, t in by_id.items()}
    V = gguf.GGUFValueType
    meta = {
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("qwen2", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY),
        "tokenizer.ggml.token_type": (types, V.ARRAY),
        "tokenizer.ggml.merges": ([m if isinstance(m, str) else " ".join(m) for m in merges], V.ARRAY),
        "tokenizer.ggml.add_bos_token": (bool(config.get("add_bos_token", False)), V.BOOL),
    }
    for key, field in (("eos_token_id", "eos_token"), ("padding_token_id", "pad_token"), ("bos_token_id", "bos_token")):
        name = config.get(field)
        name = name.get("content") if isinstance(name, dict) else name
        if name in ids:
            meta[f"tokenizer.ggml.{key}"] = (ids[name], V.UINT32)
    if "tokenizer.ggml.bos_token_id" not in meta and "<|endoftext|>" in ids:  # as llama.cpp's converter does
        meta["tokenizer.ggml.bos_token_id"] = (ids["<|endoftext|>"], V.UINT32)
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = (template, V.STRING)
    return meta
