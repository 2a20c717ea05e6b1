"""Tiny Llama-family models for fine-tuning tests, in lmforge and in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.model.checkpoint import save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY_LLAMA = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                  position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False,
                  mlp_bias=False, tie_embeddings=False)


def tiny_llama(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY_LLAMA)).eval()


@pytest.fixture
def tiny():
    return tiny_llama


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (what both tools load)."""
    folder = tmp_path / "base"
    save_checkpoint(folder, tiny_llama())
    return folder


@pytest.fixture(scope="session")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def peft():
    return pytest.importorskip("peft")
