"""The Qwen decoder (Qwen2/2.5, Qwen3, Qwen2-MoE, Qwen3-MoE), switched by ModelConfig.

Parameter names are the Hugging Face ones (model.layers.N.self_attn.q_proj.weight, lm_head.weight, ...), so a
safetensors checkpoint loads without renaming. Attention goes through the forward pass's attention
context (qwenkit.model.attention): whole sequences without a cache, or the serving engine's paged KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from qwenkit.model.attention import Attention, AttentionContext, Packed, WholeSequences
from qwenkit.model.config import ModelConfig
from qwenkit.model.moe import SparseMoE
from qwenkit.model.norm import RMSNorm
from qwenkit.model.rope import Rotary
from qwenkit.model.vision import VisionFeatures, VisionTower


@dataclass
class ImageRows:
    """Image features for a forward pass: `rows` [N] are flat indices (into B * T) of the image tokens they
    stand for, in the order of the features' rows."""

    rows: torch.Tensor
    features: VisionFeatures


class MLP(Packed):
    packed = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj = None
        self.split = (intermediate, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.split, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        fused = context.run_layer(self, x, cos, sin)
        if fused is not None:
            return fused
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class QwenForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.rotary = Rotary(config)
        self.visual = VisionTower(config.vision) if config.vision is not None else None
        self.windows = {config.layer_window(i) for i in range(config.num_hidden_layers)}
        self.gradient_checkpointing = False  # training: recompute each layer in backward instead of storing it
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the norms: quantized layers keep their weights in other types)."""
        return self.model.norm.weight.dtype

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)

    def pack_projections(self, join) -> None:
        """Join the projections each layer declares as packed (q/k/v, gate/up) where `join` can: see Packed."""
        for module in self.modules():
            if isinstance(module, Packed):
                module.pack(join)

    def forward(self, input_ids: torch.Tensor, cache: AttentionContext | None = None,
                logits: str | torch.Tensor = "all", segments: torch.Tensor | None = None,
                images: ImageRows | None = None, rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ("all"), [B, V] ("last"), [B, R, V] (a tensor of R row indices)
        or final hidden states ("none").

        `cache` is the attention context: the serving engine's paged batch (qwenkit.engine.paged), whose tokens
        continue sequences it holds. Without one, the rows are whole sequences; `segments` [B, T] may pack several
        per row (training): see WholeSequences.
        Vision-language models: `images` puts image features in place of their tokens' embeddings, and
        `rope_positions` [3, B, T] gives the multimodal rotary positions (qwenkit.model.rope.multimodal_positions);
        without them, positions are the context's, the same on all three axes.
        """
        b, t = input_ids.shape
        if cache is None:
            cache = WholeSequences(b, t, self.windows, input_ids.device, segments)
        elif segments is not None:
            raise ValueError("packed sequences (segments) are for whole-sequence forwards, without a cache")
        x = self.model.embed_tokens(input_ids)
        if images is not None:
            x = x.reshape(b * t, -1).index_copy(0, images.rows, images.features.embeds.to(x.dtype)).reshape(b, t, -1)
        cos, sin = self.rotary(cache.positions if rope_positions is None else rope_positions, x.dtype)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if recompute:  # keep only each layer's input; its activations are recomputed during backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
            if images is not None and i < len(images.features.deepstack):  # Qwen3-VL's DeepStack
                extra = images.features.deepstack[i].to(x.dtype)
                x = x.reshape(b * t, -1).index_add(0, images.rows, extra).reshape(b, t, -1)
        if isinstance(logits, torch.Tensor):
            x = x[:, logits]
        elif logits == "last":
            x = x[:, -1]
        elif logits == "none":
            return self.model.norm(x)
        return self.head(self.model.norm(x))
