"""Session-scoped fixtures of tiny loadable checkpoints (see tests/tiny_checkpoint.py).

Registered from tests/conftest.py with `pytest_plugins = ["tests.fixtures_tiny"]`. Each checkpoint is built once per
test session under pytest's temporary directory (~0.1 s each); models are loaded once and shared, so tests must not
modify their weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_checkpoint import QWEN3_TEMPLATE, tiny_gguf, tiny_hf_folder


@pytest.fixture(scope="session")
def tiny_hf_path(tmp_path_factory) -> Path:
    """A Qwen2 Hugging Face folder with the Qwen2.5 chat template and generation_config.json."""
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory) -> Path:
    """A Qwen3 Hugging Face folder with the Qwen3 hybrid-thinking chat template."""
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "qwen3", model_type="qwen3", chat_template=QWEN3_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory) -> Path:
    """The same Qwen2 model as tiny_hf_path (same weights), as an F32 GGUF file with tokenizer metadata."""
    return tiny_gguf(tmp_path_factory.mktemp("tiny") / "qwen2.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_path):
    """qwenkit.load(tiny_hf_path), loaded once per session (read-only use). Its engine keeps float32 keys and
    values, so tests may compare its logprobs with uncached float32 forwards to 1e-4 (test_generation checks the
    float16 default on its own; tests that change the engine restore this one with float32_engine)."""
    import qwenkit

    return float32_engine(qwenkit.load(tiny_hf_path, pull=False))


def float32_engine(model):
    """Start `model`'s engine with a float32 KV cache; return the model."""
    import torch

    model.start_engine(kv_dtype=torch.float32)
    return model


@pytest.fixture(scope="session")
def tiny_qwen3_model(tiny_qwen3_path):
    """qwenkit.load(tiny_qwen3_path), loaded once per session (read-only use)."""
    import qwenkit

    return qwenkit.load(tiny_qwen3_path, pull=False)
