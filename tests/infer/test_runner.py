"""`ModelRunner` computes what `Transformer.forward` computes, with fewer operations."""

import pytest
import torch

from lmforge.infer import kernels
from lmforge.infer.cache import PagedKVCache, StaticKVCache
from lmforge.infer.runner import ModelRunner


def _run(runner, model, ids, layout, prefill):
    """Prefill `prefill` tokens, then decode the rest one at a time; all logits."""
    B = ids.shape[0]
    if layout == "static":
        cache = StaticKVCache.for_model(model, B, 32)
        view = lambda: cache  # noqa: E731
    else:
        cache = PagedKVCache.for_model(model, 24, 4)
        for b in range(B):
            cache.allocate(b)
        view = lambda: cache.view(list(range(B)))  # noqa: E731
    out = [runner(ids[:, :prefill], view(), last_only=False)]
    for t in range(prefill, ids.shape[1]):
        out.append(runner(ids[:, t:t + 1], view(), last_only=False))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("layout", ["static", "paged"])
@pytest.mark.parametrize("fast", [True, False], ids=["c-decode", "pytorch"])
def test_runner_matches_model_forward(tiny, variant, layout, fast):
    if fast and not kernels.available():
        pytest.skip(f"CPU kernels: {kernels.status()}")
    model = tiny(variant)
    runner = ModelRunner(model, fast_decode=fast)
    assert runner.fast == (fast and variant not in ("alibi", "moe-qknorm"))  # those two: PyTorch only
    ids = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(_run(runner, model, ids, layout, 12), model(ids).logits, atol=1e-4, rtol=1e-4)


def test_chunk_after_a_prefix_and_last_only(tiny):
    """Speculative verification feeds several tokens after a cached prefix: a masked chunk."""
    model = tiny()
    runner = ModelRunner(model)
    ids = torch.randint(0, 97, (1, 15))
    cache = StaticKVCache.for_model(model, 1, 32)
    runner(ids[:, :6], cache)
    chunk = runner(ids[:, 6:11], cache, last_only=False)
    last = runner(ids[:, 11:15], cache)
    full = model(ids).logits
    torch.testing.assert_close(chunk[0], full[0, 6:11], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last[0], full[0, 14], atol=1e-4, rtol=1e-4)


def test_bfloat16_runner_is_close_to_the_bfloat16_model(tiny):
    model = tiny().to(torch.bfloat16)
    runner = ModelRunner(model)
    assert not runner.fast  # the C decode path is fp32 only
    ids = torch.randint(0, 97, (1, 10))
    got = _run(runner, model, ids, "static", 6).float()
    want = model(ids).logits.float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_runner_sees_in_place_weight_updates(tiny):
    """PPO updates the policy between rollouts: the runner's fused weights must follow."""
    model = tiny()
    runner = ModelRunner(model)
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        model.blocks[0].attn.k_proj.weight.mul_(2.0)
    assert runner.refresh() and not runner.refresh()
    torch.testing.assert_close(runner(ids, StaticKVCache.for_model(model, 1, 8)), model(ids).logits[:, -1],
                               atol=1e-4, rtol=1e-4)


def test_positions_past_the_context_are_an_error(tiny):
    model = tiny()
    runner = ModelRunner(model)
    cache = StaticKVCache.for_model(model, 1, 100)  # a cache larger than the model's 64 positions
    with pytest.raises(ValueError, match="context"):
        runner(torch.zeros(1, 65, dtype=torch.long), cache)


@pytest.mark.parametrize("layout", ["static", "paged"])
def test_chunks_of_one_sequence_match_model_forward(tiny, variant, layout):
    """Several new tokens of one sequence at once (speculative verification, short prompts)."""
    model = tiny(variant)
    runner = ModelRunner(model)
    ids = torch.randint(0, 97, (1, 17))
    if layout == "static":
        cache = StaticKVCache.for_model(model, 1, 32)
        view = lambda: cache  # noqa: E731
    else:
        cache = PagedKVCache.for_model(model, 24, 4)
        cache.allocate("s")
        view = lambda: cache.view(["s"])  # noqa: E731
    out = [runner(ids[:, :5], view(), last_only=False), runner(ids[:, 5:6], view(), last_only=False)]
    out += [runner(ids[:, t:t + 4], view(), last_only=False) for t in (6, 10)]
    out.append(runner(ids[:, 14:17], view(), last_only=False))
    torch.testing.assert_close(torch.cat(out, dim=1), model(ids).logits, atol=1e-4, rtol=1e-4)
