"""Tiny random configs of every architecture, built and saved with transformers, for parity tests.

Each config exercises one feature the runtime must get right (see the comment on each).
"""

from __future__ import annotations

from pathlib import Path

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)

TINY_CONFIGS: dict[str, dict] = {
    # Qwen2: q/k/v bias, untied head.
    "qwen2": dict(COMMON, model_type="qwen2", tie_word_embeddings=False),
    # Qwen2 with a tied head and sliding-window attention on the upper layers (window smaller than the prompt).
    "qwen2-tied-sliding": dict(
        COMMON,
        model_type="qwen2",
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
    ),
    # Qwen3: q/k RMSNorm, no bias, head_dim (24) unrelated to hidden/heads (16), tied head.
    "qwen3-headdim": dict(COMMON, model_type="qwen3", head_dim=24, tie_word_embeddings=True),
    # Qwen3 with YaRN RoPE scaling and an untied head.
    "qwen3-yarn": dict(
        COMMON,
        model_type="qwen3",
        head_dim=16,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # Qwen2-MoE: shared expert with its sigmoid gate, no top-k renormalisation, one dense layer.
    "qwen2_moe-shared": dict(
        COMMON,
        **MOE,
        model_type="qwen2_moe",
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    ),
    # Qwen3-MoE: q/k norm, renormalised top-k, head_dim 32.
    "qwen3_moe": dict(COMMON, **MOE, model_type="qwen3_moe", head_dim=32, norm_topk_prob=True, tie_word_embeddings=True),
}


def build_transformers_model(name: str, seed: int = 0):
    """A transformers model of TINY_CONFIGS[name] with seeded random weights, in fp32 eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(TINY_CONFIGS[name])
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # transformers' default init is small (std 0.02), which leaves logits nearly flat; larger weights make greedy
    # choices decisive, so a token flip means a real difference, not a near-tie.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model.eval()


def save_transformers_model(name: str, folder: Path, seed: int = 0):
    model = build_transformers_model(name, seed)
    model.save_pretrained(folder)
    return model
