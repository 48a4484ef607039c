"""One ModelConfig for the four Qwen architectures, read from a Hugging Face config.json or from GGUF metadata.

Field names follow config.json (as mlx-lm does), so a Hugging Face config maps onto it key for key; GGUF metadata is
translated into the same fields. Derived facts (head_dim, which layers are MoE or sliding) are methods, so they are
computed one way for both sources.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.errors import BadCheckpoint, UnsupportedModel

MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")

# Vision-language families -> the decoder they wrap. Their config.json nests the decoder's fields in text_config
# (older Qwen2.5-VL files keep them at the top level) and the vision tower's in vision_config.
VISION_FAMILIES = {"qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3"}

# GGUF's general.architecture -> Hugging Face model_type.
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# llama.cpp's language models of Qwen2.5-VL and Qwen3-VL (convert_hf_to_gguf.py's Qwen2VLModel, Qwen3VLTextModel):
# the decoder's tensors as in qwen2/qwen3, plus {arch}.rope.dimension_sections (M-RoPE) and, for qwen3vl,
# {arch}.n_deepstack_layers. The vision tower is in a separate mmproj file (qwenkit.checkpoint.mmproj).
GGUF_VL_ARCHITECTURES = {"qwen2vl": "qwen2", "qwen3vl": "qwen3"}
# llama.cpp runs qwen2vl's M-RoPE in runs of sections and qwen3vl's interleaved (its IMROPE), as transformers does.
GGUF_INTERLEAVED_MROPE = {"qwen2vl": False, "qwen3vl": True}


@dataclass
class VisionConfig:
    """The vision tower of a Qwen VL model (vision_config in config.json; names as there)."""

    family: str  # qwen2_5_vl | qwen3_vl
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    # Qwen2.5-VL: window attention everywhere but these blocks; windows of window_size pixels
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    # Qwen3-VL: a learned position table, and features taken after these blocks into early decoder layers
    num_position_embeddings: int = 0
    deepstack_visual_indexes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                     "temporal_patch_size", "spatial_merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BadCheckpoint(f"vision_config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise BadCheckpoint("vision_config: hidden_size / num_heads must be a multiple of 4 (2D rotary)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, family: str, raw: dict[str, Any], source: str) -> VisionConfig:
        if not isinstance(raw, dict):
            raise BadCheckpoint(f"{source}: vision_config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        if "in_chans" in raw and "in_channels" not in raw:  # the first Qwen2.5-VL releases
            kwargs["in_channels"] = raw["in_chans"]
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        try:
            return cls(family=family, **kwargs)
        except TypeError as e:
            raise BadCheckpoint(f"{source}: vision_config: {e}") from None
        except BadCheckpoint as e:
            raise BadCheckpoint(f"{source}: {e}") from None


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int = 0
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool | None = None  # None: the architecture's default (q/k/v bias for Qwen2, none for Qwen3)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    layer_types: list[str] | None = None
    # Mixture of experts (qwen2_moe, qwen3_moe).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Vision-language models: the tower, the placeholder token an image's features replace, and multimodal
    # rotary positions (mrope_section splits head_dim / 2 among the temporal, height and width axes).
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    mrope_section: list[int] | None = None
    mrope_interleaved: bool = False  # Qwen3-VL: the axes alternate over the frequencies instead of in runs

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise UnsupportedModel(f"unsupported model_type {self.model_type!r} (supported: {', '.join(MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BadCheckpoint(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise BadCheckpoint(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise BadCheckpoint("hidden_size is not a multiple of num_attention_heads and no head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.is_moe and (self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts):
            raise BadCheckpoint(
                f"MoE config needs 0 < num_experts_per_tok <= num_experts, "
                f"got {self.num_experts_per_tok} of {self.num_experts}"
            )

    # ---- derived facts -------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type.endswith("_moe")

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 and Qwen2-MoE carry q/k/v biases; Qwen3 follows attention_bias (false in every release)."""
        if self.model_type in ("qwen2", "qwen2_moe"):
            return True if self.attention_bias is None else bool(self.attention_bias)
        return bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.model_type in ("qwen3", "qwen3_moe") and bool(self.attention_bias)

    @property
    def qk_norm(self) -> bool:
        return self.model_type in ("qwen3", "qwen3_moe")

    @property
    def has_shared_expert(self) -> bool:
        return self.model_type == "qwen2_moe" and self.shared_expert_intermediate_size > 0

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def layer_window(self, i: int) -> int | None:
        """The sliding-window size of layer i, or None for full attention (same rules as transformers)."""
        if not self.use_sliding_window or not self.sliding_window:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        if self.model_type == "qwen3_moe":
            return self.sliding_window
        if self.model_type == "qwen2_moe":
            return self.sliding_window if (i + 1) % 2 and i < self.max_window_layers else None
        return self.sliding_window if i >= self.max_window_layers else None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ---- readers -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise BadCheckpoint(f"{source}: expected a JSON object")
        model_type = raw.get("model_type")
        if model_type in VISION_FAMILIES:
            return cls._vision_language(raw, source)
        if model_type not in MODEL_TYPES:
            raise UnsupportedModel(f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        # transformers >= 4.56 writes rope_parameters = {rope_type, rope_theta, factor, ...} instead of the pair.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "num_experts" not in kwargs and raw.get("num_local_experts"):  # transformers' alias for Qwen3-MoE
            kwargs["num_experts"] = raw["num_local_experts"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = raw.get("num_attention_heads")
        if model_type == "qwen2_moe" and "qkv_bias" in raw:
            kwargs["attention_bias"] = bool(raw["qkv_bias"])
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise BadCheckpoint(f"{source}: {e}") from None
        except BadCheckpoint as e:
            raise type(e)(f"{source}: {e}") from None

    @classmethod
    def _vision_language(cls, raw: dict[str, Any], source: str) -> ModelConfig:
        family = raw["model_type"]
        text = raw.get("text_config") or {}
        if not isinstance(text, dict):
            raise BadCheckpoint(f"{source}: text_config must be a JSON object")
        top = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
        merged = {**top, **{k: v for k, v in text.items() if v is not None}, "model_type": VISION_FAMILIES[family]}
        if "tie_word_embeddings" in top:  # the top-level flag is the one transformers acts on
            merged["tie_word_embeddings"] = top["tie_word_embeddings"]
        parameters, scaling = merged.pop("rope_parameters", None), merged.pop("rope_scaling", None)
        rope = dict(parameters or scaling or {})
        section = rope.pop("mrope_section", None)
        interleaved = bool(rope.pop("mrope_interleaved", False))
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        merged["rope_parameters"] = {**rope, "rope_type": "default" if kind == "mrope" else kind}
        config = cls.from_dict(merged, source)
        if not isinstance(section, list) or sum(section) != config.head_dim // 2 or len(section) != 3:
            raise BadCheckpoint(f"{source}: mrope_section {section!r} must be 3 sizes summing to head_dim / 2 "
                                f"({config.head_dim // 2})")
        config.mrope_section, config.mrope_interleaved = [int(n) for n in section], interleaved
        config.vision = VisionConfig.from_dict(family, raw.get("vision_config"), source)
        if config.vision.out_hidden_size != config.hidden_size:
            raise BadCheckpoint(f"{source}: vision out_hidden_size {config.vision.out_hidden_size} is not the "
                                f"decoder's hidden_size {config.hidden_size}")
        config.image_token_id = raw.get("image_token_id", 151655)
        config.vision_start_token_id = raw.get("vision_start_token_id", 151652)
        return config

    @classmethod
    def from_json_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadCheckpoint(f"{path}: missing config.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadCheckpoint(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF") -> ModelConfig:
        arch = meta.get("general.architecture")
        model_type = GGUF_ARCHITECTURES.get(arch) or GGUF_VL_ARCHITECTURES.get(arch)  # type: ignore[arg-type]
        if model_type is None:
            supported = ", ".join([*GGUF_ARCHITECTURES, *GGUF_VL_ARCHITECTURES])
            raise UnsupportedModel(f"{source}: unsupported GGUF architecture {arch!r} (supported: {supported})")

        def get(key: str, default: Any = KeyError) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is KeyError:
                raise BadCheckpoint(f"{source}: missing metadata key {arch}.{key}")
            return value

        n_head = get("attention.head_count")
        n_kv = get("attention.head_count_kv", n_head)
        if isinstance(n_head, list) or isinstance(n_kv, list):
            raise UnsupportedModel(f"{source}: per-layer head counts are not supported")
        hidden = get("embedding_length")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get("vocab_size", len(tokens) if isinstance(tokens, list) else None)
        if vocab is None:
            raise BadCheckpoint(f"{source}: no vocab_size and no tokenizer.ggml.tokens")
        key_length = get("attention.key_length", None)
        kwargs: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=get("block_count"),
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            intermediate_size=get("feed_forward_length", 0),
            head_dim=key_length,
            max_position_embeddings=get("context_length", 32768),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        )
        scaling = get("rope.scaling.type", None)
        if scaling == "yarn":
            kwargs["rope_scaling"] = {
                "rope_type": "yarn",
                "factor": float(get("rope.scaling.factor")),
                "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
            }
        elif scaling == "linear":
            kwargs["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling not in (None, "none"):
            raise UnsupportedModel(f"{source}: unsupported rope scaling {scaling!r}")
        window = get("attention.sliding_window", None)
        if window:
            kwargs.update(use_sliding_window=True, sliding_window=int(window))
        if model_type.endswith("_moe"):
            kwargs.update(
                num_experts=get("expert_count"),
                num_experts_per_tok=get("expert_used_count"),
                moe_intermediate_size=get("expert_feed_forward_length"),
                # llama.cpp renormalises Qwen3-MoE's top-k and never Qwen2-MoE's; the files do not record it.
                norm_topk_prob=model_type == "qwen3_moe",
            )
            if model_type == "qwen2_moe":
                kwargs["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length", 0)
        try:
            config = cls(**kwargs)
        except TypeError as e:
            raise BadCheckpoint(f"{source}: {e}") from None
        if arch in GGUF_VL_ARCHITECTURES:
            config.mrope_section = _dimension_sections(get("rope.dimension_sections"), config.head_dim,
                                                       f"{source}: {arch}.rope.dimension_sections")
            config.mrope_interleaved = GGUF_INTERLEAVED_MROPE[arch]
        return config


def _dimension_sections(value: Any, head_dim: int, where: str) -> list[int]:
    """mrope_section from llama.cpp's four rotary sections (temporal, height, width, and a fourth that only
    other models use, 0 here): the first three must share head_dim / 2 between them."""
    if (not isinstance(value, list) or len(value) < 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)):
        raise BadCheckpoint(f"{where} must be a list of at least 3 non-negative integers, got {value!r}")
    if any(value[3:]) or sum(value[:3]) != head_dim // 2:
        raise BadCheckpoint(f"{where} {value!r}: the first 3 must sum to head_dim / 2 ({head_dim // 2}) and the "
                            f"rest be 0")
    return [int(n) for n in value[:3]]
