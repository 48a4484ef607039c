"""Complete, tiny, loadable checkpoints: `qwenkit.load(path)` works end to end on them in a fraction of a second.

- `tiny_tokenizer_json()`: a byte-level BPE tokenizer shaped like Qwen's (NFC, the qwen2 split regex + byte-level
  mapping, byte-level decoder, Qwen's added tokens after the BPE vocabulary), trained with the `tokenizers` library on
  a small fixed corpus of English, Chinese and code. 432 ids in all (423 BPE + 9 added); deterministic.
- `tiny_hf_folder(dest, ...)`: config.json, model.safetensors (seeded random weights of a TINY_CONFIGS shape, vocab
  matching the tokenizer), tokenizer.json, tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>, chat template)
  and generation_config.json.
- `tiny_gguf(dest, ...)`: the same model (same seed, same weights) as a GGUF file with llama.cpp-style tokenizer
  metadata, so qwenkit's GGUF path builds the tokenizer from the file.

No transformers import (that alone takes seconds): the weights come from qwenkit's own model class, whose parameter
names are the Hugging Face ones. Building a folder takes ~0.1 s; loading it with qwenkit.load well under a second.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tests.tiny_models import TINY_CONFIGS

FIXTURES = Path(__file__).parent / "fixtures"
# Qwen2.5's chat template (default system prompt, tools in the system turn), from the default model's GGUF metadata.
QWEN25_TEMPLATE = (FIXTURES / "qwen25_chat_template.jinja").read_text(encoding="utf-8")
# Qwen3's hybrid-thinking template (enable_thinking switch, <think> handling).
QWEN3_TEMPLATE = (FIXTURES / "qwen3_chat_template.jinja").read_text(encoding="utf-8")

# Added tokens in Qwen's order (after the BPE vocabulary), and whether each is "special" (skipped when decoding).
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
TOTAL_TOKENS = 432  # BPE vocabulary (256 bytes + merges) + the added tokens; a multiple of 8
BPE_SIZE = TOTAL_TOKENS - len(ADDED_TOKENS)

# model_type (or a TINY_CONFIGS name) -> the TINY_CONFIGS shape used.
SHAPES = {
    "qwen2": "qwen2",
    "qwen3": "qwen3-headdim",
    "qwen2_moe": "qwen2_moe-shared",
    "qwen3_moe": "qwen3_moe",
}

CORPUS = [
    # English prose
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long.",
    "Hello, world! How are you today? I am fine, thank you. What is your name?",
    "Once upon a time there was a little model that wanted to learn how to speak and write.",
    "Please translate the following sentence into English, and keep the meaning the same.",
    "The weather is nice today; let's go for a walk in the park and then have some tea.",
    "You are a helpful assistant. Answer the question as briefly as you can, then stop.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e-6 50% $19.99",
    "I'm sure they'll say we've done what you'd expect: it's not the end, it's the start.",
    # Chinese
    "你好,世界!今天天气很好,我们去公园散步吧。",
    "我是一个有用的助手。请问你叫什么名字?我喜欢学习中文和英文。",
    "人工智能正在改变我们的生活和工作方式。模型可以写代码,也可以翻译句子。",
    "他每天早上七点起床,然后喝一杯茶,看一会儿书。中国的首都是北京。",
    "这个问题很简单,答案是四十二。谢谢你的帮助!再见。",
    # Code
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import json\n\ndata = json.loads('{\"name\": \"qwen\", \"size\": 0.5}')\nprint(data[\"name\"])\n",
    "function hello(name) {\n  return `Hello, ${name}!`;\n}\nconsole.log(hello(\"world\"));\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"hello\\n\");\n    return 0;\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    # Mixed, emoji and accents (multi-byte characters the decoder must not cut in half)
    "Café déjà vu, naïve façade; Größe, Straße. 😀 👍 🎉 résumé",
    "Qwen 是阿里云开发的模型 (Qwen is a model by Alibaba Cloud). 😀",
]


@lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """tokenizer.json text of the tiny Qwen-shaped byte-level BPE tokenizer (same bytes on every run)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    from qwenkit.text.tokenizer import QWEN2_SPLIT_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    if tok.get_vocab_size() != BPE_SIZE:
        raise RuntimeError(f"tiny tokenizer: trained {tok.get_vocab_size()} BPE tokens, expected {BPE_SIZE}")
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    # Round-trip through JSON with sorted vocabulary so the text never depends on hash-map order.
    raw = json.loads(tok.to_str())
    raw["model"]["vocab"] = dict(sorted(raw["model"]["vocab"].items(), key=lambda kv: kv[1]))
    text = json.dumps(raw, ensure_ascii=False, indent=2)
    check = Tokenizer.from_str(text)
    assert check.get_vocab_size(with_added_tokens=True) == TOTAL_TOKENS
    assert all(check.token_to_id(content) == IDS[content] for content, _ in ADDED_TOKENS)
    return text


def token_id(content: str) -> int:
    """The id of a token of the tiny tokenizer (added tokens included)."""
    from tokenizers import Tokenizer

    tid = Tokenizer.from_str(tiny_tokenizer_json()).token_to_id(content)
    if tid is None:
        raise KeyError(content)
    return tid


IDS = {content: BPE_SIZE + i for i, (content, _) in enumerate(ADDED_TOKENS)}
ENDOFTEXT, IM_START, IM_END = IDS["<|endoftext|>"], IDS["<|im_start|>"], IDS["<|im_end|>"]

# generation_config.json: Qwen's recommended sampling; no repetition penalty, so greedy is a plain argmax.
GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT,
    "pad_token_id": ENDOFTEXT,
    "do_sample": True,
    "eos_token_id": [IM_END, ENDOFTEXT],
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def tiny_config(model_type: str = "qwen2") -> dict:
    """config.json of the tiny model: a TINY_CONFIGS shape with the tokenizer's vocabulary and Qwen's special ids."""
    name = SHAPES.get(model_type, model_type)
    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny model {model_type!r}; use one of {sorted(SHAPES)} or {sorted(TINY_CONFIGS)}")
    raw = dict(TINY_CONFIGS[name])
    raw.update(vocab_size=TOTAL_TOKENS, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, torch_dtype="float32")
    raw["architectures"] = [
        {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM"}[raw["model_type"]]
    ]
    return raw


def tiny_model(model_type: str = "qwen2", seed: int = 0):
    """qwenkit's QwenForCausalLM of the tiny config with seeded random weights (fp32, eval mode).

    Weights are N(0, 0.15) like tests/tiny_models.build_transformers_model (decisive greedy choices), biases
    N(0, 0.05), norm weights 1 + N(0, 0.05).
    """
    import torch

    from qwenkit.model.config import ModelConfig
    from qwenkit.model.qwen import QwenForCausalLM

    config = ModelConfig.from_dict(tiny_config(model_type), source="tiny config")
    return randomized(QwenForCausalLM(config), seed)


def randomized(model, seed: int):
    """`model` in fp32 eval mode with seeded random weights, as tiny_model describes (norms: names with "norm" or
    Qwen2.5-VL's merger "ln_q")."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    model = model.float().eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        elif "norm" in name or "ln_q" in name:
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.05)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def other_vocabulary(src: Path, dest: Path) -> Path:
    """A copy of the tiny folder `src` whose tokenizer names one token differently: a would-be draft model whose
    vocabulary is not the target's."""
    import shutil

    shutil.copytree(src, dest)
    data = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["renamed-token"] = vocab.pop(min(vocab, key=vocab.get))
    (dest / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return dest


def tiny_hf_folder(
    dest: Path,
    model_type: str = "qwen2",
    chat_template: str | None = QWEN25_TEMPLATE,
    seed: int = 0,
    generation_config: dict | None = GENERATION_CONFIG,
) -> Path:
    """Write a complete Hugging Face checkpoint folder of the tiny model to `dest` (created) and return it.

    model_type: qwen2 | qwen3 | qwen2_moe | qwen3_moe, or a TINY_CONFIGS name. chat_template None: none shipped.
    generation_config None: no generation_config.json.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = tiny_model(model_type, seed)
    config = tiny_config(model_type)
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(IDS[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": s}
            for c, s in ADDED_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": config["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8")
    if generation_config is not None:
        (dest / "generation_config.json").write_text(json.dumps(generation_config, indent=2), encoding="utf-8")
    return dest


def gguf_tokenizer_metadata(chat_template: str | None = QWEN25_TEMPLATE) -> dict:
    """The tokenizer.* GGUF metadata of the tiny tokenizer, as llama.cpp's converter writes it for Qwen2."""
    import gguf

    raw = json.loads(tiny_tokenizer_json())
    by_id = {i: t for t, i in raw["model"]["vocab"].items()}
    special = {content for content, s in ADDED_TOKENS if s}
    for content, _ in ADDED_TOKENS:
        by_id[IDS[content]] = content
    tokens = [by_id[i] for i in range(TOTAL_TOKENS)]
    T = gguf.TokenType
    types = [T.CONTROL if t in special else T.USER_DEFINED if i >= BPE_SIZE else T.NORMAL for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    V = gguf.GGUFValueType
    meta = {
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("qwen2", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY),
        "tokenizer.ggml.token_type": ([int(t) for t in types], V.ARRAY),
        "tokenizer.ggml.merges": (merges, V.ARRAY),
        "tokenizer.ggml.eos_token_id": (IM_END, V.UINT32),
        "tokenizer.ggml.padding_token_id": (ENDOFTEXT, V.UINT32),
        "tokenizer.ggml.bos_token_id": (ENDOFTEXT, V.UINT32),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL),
    }
    if chat_template is not None:
        meta["tokenizer.chat_template"] = (chat_template, V.STRING)
    return meta


def tiny_gguf(
    dest: Path, model_type: str = "qwen2", qtype=None, chat_template: str | None = QWEN25_TEMPLATE, seed: int = 0
) -> Path:
    """Write the tiny model (same weights as tiny_hf_folder with the same seed) as a GGUF file and return its path.

    dest: a file path (…/x.gguf) or an existing folder (the file is dest/tiny-<model_type>.gguf).
    qtype: a gguf.GGMLQuantizationType for the 2-D/3-D weights (None: F32). Rows must be whole blocks: Q8_0/Q4_0
    work for every shape except qwen2_moe (its shared expert's 48-wide down_proj); the 256-wide K-quants fit none.
    """
    from qwenkit.checkpoint.gguf_write import write_gguf

    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"tiny-{model_type}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_model(model_type, seed)
    return write_gguf(model, dest, qtype=qtype, tokenizer_meta=gguf_tokenizer_metadata(chat_template))
