"""A tiny random model of each architecture written to GGUF F32 loads back with the same logits."""

import pytest
import torch

from qwenkit.checkpoint.loader import load_weights
from qwenkit.checkpoint.gguf_write import write_gguf
from tests.tiny_models import TINY_CONFIGS, save_transformers_model

pytestmark = pytest.mark.peer

# llama.cpp has no sliding-window qwen2 in GGUF; every other tiny architecture goes through the file.
GGUF_CONFIGS = [n for n in TINY_CONFIGS if "sliding" not in n]


@pytest.mark.parametrize("name", GGUF_CONFIGS)
def test_gguf_f32_export_gives_same_logits_as_safetensors(name, tmp_path):
    save_transformers_model(name, tmp_path / "hf")
    from_safetensors, _ = load_weights(tmp_path / "hf")
    path = write_gguf(from_safetensors, tmp_path / "model.gguf")
    from_gguf, config = load_weights(path)
    assert config.model_type == from_safetensors.config.model_type
    ids = torch.randint(0, config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = from_safetensors(ids), from_gguf(ids)
    # Same fp32 weights, same code: identical up to the last bit.
    assert torch.equal(a, b)


def test_split_gguf_loads_as_one_model(tmp_path):
    """A model written by llama.cpp's writer in shards loads from its first shard with the same logits."""
    save_transformers_model("qwen2", tmp_path / "hf")
    whole, _ = load_weights(tmp_path / "hf")
    first = write_gguf(whole, tmp_path / "model.gguf", split_max_tensors=16)
    shards = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert len(shards) >= 2 and first == shards[0]
    split, _ = load_weights(first)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole(ids), split(ids))
    shards[-1].unlink()
    from qwenkit.errors import BadCheckpoint

    with pytest.raises(BadCheckpoint, match="shard .* is missing"):
        load_weights(first)
