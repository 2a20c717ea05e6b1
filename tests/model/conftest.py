"""Fixtures for the GGUF tests: the real SmolLM2 file, read once per session.

`smollm2_gguf` (the path) comes from tests/conftest.py, which fetches the file through
`lmforge.hub.smollm2_gguf_path()`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmforge.formats.gguf import GGUFFile
from lmforge.model.gguf import load_gguf_model
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="session")
def smollm2_file(smollm2_gguf) -> GGUFFile:
    return GGUFFile(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """(config, float32 state dict, metadata) as `load_gguf_model` returns them."""
    return load_gguf_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_lmforge(smollm2_loaded) -> Transformer:
    config, state, _ = smollm2_loaded
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer_metadata(smollm2_file) -> dict[str, Any]:
    """What `Tokenizer.gguf_metadata()` returns, taken from the file's own tokenizer keys."""
    return {k: v for k, v in smollm2_file.metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def smollm2_prompt_ids(smollm2_file) -> torch.Tensor:
    """'The capital of France is a city where' as SmolLM2 token ids, looked up in its vocabulary."""
    vocab = smollm2_file.metadata["tokenizer.ggml.tokens"]
    words = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "Ġa", "Ġcity", "Ġwhere"]
    return torch.tensor([[vocab.index(w) for w in words]])
