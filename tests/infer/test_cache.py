"""Cached decoding must give the logits of recomputing the whole sequence, for both cache layouts."""

import pytest
import torch

from lmforge.infer.cache import CacheFullError, PagedKVCache, StaticKVCache
from lmforge.model.config import ModelConfig


def test_prefill_then_decode_matches_full_forward(tiny, variant):
    model = tiny(variant)
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


@pytest.mark.parametrize("layout", ["static", "paged"])
def test_ragged_batch_of_sequences_matches_each_alone(tiny, variant, layout):
    """Sequences of different lengths decoded together (what continuous batching does)."""
    model = tiny(variant)
    lengths = [3, 9, 6]
    seqs = [torch.randint(0, 97, (n + 4,)) for n in lengths]
    if layout == "static":
        cache = StaticKVCache.for_model(model, batch_size=4, max_len=32, lazy=True)
    else:
        cache = PagedKVCache.for_model(model, num_blocks=16, block_size=4)
    for i, (seq, n) in enumerate(zip(seqs, lengths)):  # each prompt prefilled on its own
        cache.allocate(i)
        model(seq[None, :n], torch.arange(n)[None], cache.view([i]))
    order = sorted(range(3), key=cache.order)
    for step in range(4):  # then decoded as one batch, each row at its own position
        ids = torch.stack([seqs[i][lengths[i] + step] for i in order])[:, None]
        positions = torch.tensor([[lengths[i] + step] for i in order])
        out = model(ids, positions, cache.view(order)).logits[:, -1]
        for row, i in enumerate(order):
            expected = model(seqs[i][None, : lengths[i] + step + 1]).logits[0, -1]
            torch.testing.assert_close(out[row], expected, atol=1e-4, rtol=1e-4)


def test_cache_overflow_is_a_clear_error(tiny):
    model = tiny("gpt2")
    cache = StaticKVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], cache)
    paged = PagedKVCache.for_model(model, num_blocks=3, block_size=2)  # block 0 is padding: 4 tokens
    paged.allocate("a")
    with pytest.raises(CacheFullError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], paged.view(["a"]))


def test_cache_memory_formula():
    config = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
    cache = StaticKVCache(config, batch_size=3, max_len=10)
    per_token = 2 * config.n_layers * config.kv_heads * config.dim_per_head * 4
    assert cache.nbytes() == 3 * 10 * per_token
    paged = PagedKVCache(config, num_blocks=5, block_size=8)
    assert paged.nbytes() == 5 * 8 * per_token


def test_paged_blocks_follow_the_tokens_and_come_back_on_free(tiny):
    model = tiny()
    cache = PagedKVCache.for_model(model, num_blocks=9, block_size=4)
    assert cache.free_tokens() == 32
    cache.allocate("a")
    model(torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None], cache.view(["a"]))
    assert len(cache.tables["a"]) == 2 and cache.free_tokens() == 24  # 6 tokens -> 2 blocks of 4
    cache.truncate("a", 3)
    assert len(cache.tables["a"]) == 1 and cache.key_pos[cache.tables["a"][0] * 4 + 3] == -1
    cache.free("a")
    assert cache.free_tokens() == 32 and "a" not in cache.tables


def test_static_slots_grow_and_compact(tiny):
    model = tiny()
    cache = StaticKVCache.for_model(model, batch_size=4, max_len=40, lazy=True)
    assert cache.keys.shape[1] == 1  # one slot until a second sequence arrives
    for name in "abc":
        cache.allocate(name)
    assert cache.keys.shape[1] == 4
    model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None], cache.view(["c"]))
    kept = cache.keys[:, cache.order("c"), :, :3].clone()
    cache.free("a")  # "c", in the last used slot, moves into the gap
    assert cache.order("c") == 0 and cache.seq_length("c") == 3
    torch.testing.assert_close(cache.keys[:, 0, :, :3], kept)
    with pytest.raises(ValueError, match="consecutive"):
        cache.view(["b", "c"])
    cache.view(["c", "b"])
