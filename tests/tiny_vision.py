"""Tiny Qwen2.5-VL and Qwen3-VL checkpoints: complete Hugging Face folders that qwenkit.load and transformers'
from_pretrained both open, built in a fraction of a second with qwenkit's own model class (no transformers import).

- The tokenizer is the tiny one (tests.tiny_checkpoint) plus the three vision tokens after it.
- config.json has the VL layout (text_config and vision_config nested, as transformers 5 writes them); the weights
  are saved under each family's released names: Qwen2.5-VL's visual.* / model.*, Qwen3-VL's model.visual.* /
  model.language_model.*, so both of the loader's name layouts are exercised.
- The chat template is Qwen2-VL's (the one Qwen2.5-VL ships): image parts become
  <|vision_start|><|image_pad|><|vision_end|>.
- preprocessor_config.json keeps images small (at most 16 image tokens), so a test's prompts stay short.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenkit.checkpoint.names import released_name
from tests.tiny_checkpoint import GENERATION_CONFIG, IDS, TOTAL_TOKENS, randomized, tiny_tokenizer_json

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
VISION_START, VISION_END, IMAGE_PAD = (TOTAL_TOKENS + i for i in range(3))
VOCAB = TOTAL_TOKENS + 8  # room for the vision tokens, a multiple of 8

# Qwen2-VL's chat template, as Qwen/Qwen2.5-VL-*-Instruct ship it in chat_template.json.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
FAMILIES = {
    # Window attention with a window of 2x2 merged blocks (56 px), full attention in block 1.
    "qwen2_5_vl": dict(
        text=dict(TEXT, model_type="qwen2_5_vl_text",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                    window_size=56, fullatt_block_indexes=[1], hidden_act="silu", spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3),
        tie=False, patch=14, mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
    ),
    # Interleaved M-RoPE, head_dim 16 (not hidden / heads), DeepStack into decoder layers 0 and 1, a tied head.
    "qwen3_vl": dict(
        text=dict(TEXT, model_type="qwen3_vl_text", head_dim=16, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                   "mrope_interleaved": True}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                    num_position_embeddings=16, deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh",
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        tie=True, patch=16, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
    ),
}
ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


PHOTOS = Path(__file__).parent / "fixtures" / "images"


def two_photo_chat() -> list[dict]:
    """A chat turn with two real photos of different shapes (one wide once rotated by EXIF, one tall) and text."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(PHOTOS / "chelsea_exif6.jpg")}},
        {"type": "text", "text": "What is in the first picture, and what in the second?"},
        {"type": "image_url", "image_url": {"url": str(PHOTOS / "astronaut_tall.png")}},
    ]}]


def tiny_vl_config(family: str) -> dict:
    f = FAMILIES[family]
    return {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "dtype": "float32",
        "text_config": dict(f["text"], bos_token_id=IDS["<|endoftext|>"], eos_token_id=IDS["<|im_end|>"]),
        "vision_config": dict(f["vision"]), "tie_word_embeddings": f["tie"],
        "image_token_id": IMAGE_PAD, "video_token_id": IMAGE_PAD + 1, "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END, "bos_token_id": IDS["<|endoftext|>"], "eos_token_id": IDS["<|im_end|>"],
    }


def tiny_vl_model(family: str, seed: int = 0):
    """qwenkit's model of the tiny VL config with seeded random weights (as tests.tiny_checkpoint.tiny_model)."""
    from qwenkit.model.config import ModelConfig
    from qwenkit.model.qwen import QwenForCausalLM

    config = ModelConfig.from_dict(tiny_vl_config(family), source="tiny VL config")
    return randomized(QwenForCausalLM(config), seed)


def _vl_tokenizer_json() -> str:
    raw = json.loads(tiny_tokenizer_json())
    for i, content in enumerate(VISION_TOKENS):
        raw["added_tokens"].append({"id": TOTAL_TOKENS + i, "content": content, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    return json.dumps(raw, ensure_ascii=False, indent=2)


def tiny_vl_folder(dest: Path, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a complete tiny VL checkpoint folder to `dest` (created) and return it."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    f = FAMILIES[family]
    model = tiny_vl_model(family, seed)
    (dest / "config.json").write_text(json.dumps(tiny_vl_config(family), indent=2), encoding="utf-8")
    tensors = {released_name(k, family): v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "tokenizer.json").write_text(_vl_tokenizer_json(), encoding="utf-8")
    added = {str(IDS[c]): c for c in IDS} | {str(TOTAL_TOKENS + i): c for i, c in enumerate(VISION_TOKENS)}
    tok_config = {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 512, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "chat_template": QWEN2_VL_TEMPLATE,
        "added_tokens_decoder": {i: {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": c.startswith("<|")} for i, c in added.items()},
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    (dest / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2), encoding="utf-8")
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": f["patch"],
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": f["mean"], "image_std": f["std"],
                    "min_pixels": (2 * f["patch"]) ** 2 * 4, "max_pixels": (2 * f["patch"]) ** 2 * 16}
    (dest / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    return dest
