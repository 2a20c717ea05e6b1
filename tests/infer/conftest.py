"""Tiny random models for fast inference tests, and transformers' SmolLM2 as a reference."""

import pytest
import torch
from tests.conftest import one_torch_thread

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=64)
VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, qkv_bias=False,
                      out_bias=False, mlp_bias=False),
    "alibi": dict(position="alibi", norm="rmsnorm"),
    "sliding-window": dict(position="rope", sliding_window=5, n_kv_heads=1),
    "qknorm-relu2": dict(position="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", n_kv_heads=2),
    "moe-qknorm": dict(position="rope", n_experts=4, n_experts_per_token=2, qk_norm=True, mlp="swiglu"),
}


def tiny_model(variant: str = "llama-gqa", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**(TINY | VARIANTS[variant] | overrides))).eval()
    with torch.no_grad():  # larger weights than the init's, so that distributions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own SmolLM2 from the same GGUF: the reference for parity tests."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture
def tiny():
    """`tiny(variant="llama-gqa", seed=0, **config overrides)` -> a small random Transformer."""
    return tiny_model


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    """Runs a test once per architecture variant (GPT-2, Llama GQA, ALiBi, sliding window, QK-norm, MoE)."""
    return request.param


_one_thread = one_torch_thread()
