"""Cached decoding must give the logits of recomputing the whole sequence."""

import pytest
import torch

from lmforge.infer.cache import StaticKVCache
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, d_ff=96, max_seq_len=64)
VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, qkv_bias=False),
    "alibi": dict(position="alibi", norm="rmsnorm"),
    "sliding-window": dict(position="rope", sliding_window=5, n_kv_heads=1),
    "moe-qknorm": dict(position="rope", n_experts=4, n_experts_per_token=2, qk_norm=True, mlp="swiglu"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_decode_matches_full_forward(variant):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, **VARIANTS[variant])).eval()
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids).logits

    cache = StaticKVCache.for_model(model, batch_size=2, max_len=32)
    prefill = 12
    positions = torch.arange(prefill).expand(2, prefill)
    logits = [model(ids[:, :prefill], positions, cache).logits]
    for t in range(prefill, 20):
        logits.append(model(ids[:, t : t + 1], torch.full((2, 1), t), cache).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = Transformer(ModelConfig(**TINY)).eval()
    cache = StaticKVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], cache)


def test_cache_memory_formula():
    config = ModelConfig(**TINY, n_kv_heads=2)
    cache = StaticKVCache(config, batch_size=3, max_len=10)
    per_token = 2 * config.n_layers * config.kv_heads * config.dim_per_head * 4
    assert cache.nbytes() == 3 * 10 * per_token
