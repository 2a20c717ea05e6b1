"""Chunked prefill: a step runs at most `prefill_chunk` prompt tokens, the running requests keep decoding
every step meanwhile, and every request's tokens and logprobs are what whole-prompt prefill gives."""

from __future__ import annotations

import pytest

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.tune.prefix import PrefixConfig, add_prefix

from .conftest import tiny_model

LONG = list(range(3, 43))  # 40 tokens
MIXED = [LONG, [1, 2, 3], list(range(50, 80)), [7], LONG, LONG[:20] + [90, 91], list(range(10, 35)), [4, 5]]


def _params(i: int) -> SamplingParams:
    """Greedy and seeded sampling with logprobs, and replies of different lengths (so that requests
    finish while others are still being prefilled)."""
    if i % 2:
        return SamplingParams(temperature=0.9, top_k=20, seed=i, max_tokens=3 + i, logprobs=True)
    return SamplingParams(temperature=0, max_tokens=3 + i, logprobs=True)


def _engine(model, cache: str, chunk: int | None, **kwargs) -> Engine:
    options = {"block_size": 4, "num_blocks": 200} if cache == "paged" else {}
    return Engine(model, cache=cache, prefill_chunk=chunk, **(options | kwargs))


@pytest.mark.parametrize("cache", ["static", "paged"])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_gives_the_same_tokens_and_logprobs(cache, chunk):
    model = tiny_model()
    params = [_params(i) for i in range(len(MIXED))]
    want = _engine(model, cache, None, max_batch_size=3).complete(MIXED, params)
    engine = _engine(model, cache, chunk, max_batch_size=3)
    got = engine.complete(MIXED, params)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    assert not engine.prefilling and not engine.running


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_a_long_prompt_does_not_stall_the_running_requests(cache):
    engine = _engine(tiny_model(), cache, 4, max_batch_size=4)
    endless = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = [engine.add_request(p, endless) for p in ([1, 2], [5, 6, 7])]
    engine.step()
    engine.step()  # 4 prompt tokens a step: the second prompt's last token runs in this one
    assert len(engine.running) == 2
    long = engine.add_request(LONG, SamplingParams(temperature=0, max_tokens=5))
    steps = 0
    while not engine.sequences[long].output_ids:
        events = engine.step()
        steps += 1
        # every running request emits a token in every step; the long prompt joins them after its last chunk
        assert sorted(e.request_id for e in events if e.request_id in short) == short
        assert [e.request_id for e in events if e.request_id == long] == ([long, long] if steps == 10 else [])
        assert (engine.sequences[long] in engine.prefilling) == (steps < 10)
    assert steps == len(LONG) // 4
    assert engine.stats(long).prompt_tokens == 40


def test_whole_prompts_run_in_one_step():
    engine = _engine(tiny_model(), "static", None)
    rid = engine.add_request(LONG, SamplingParams(temperature=0, max_tokens=3))
    assert [e.request_id for e in engine.step()] == [rid, rid]  # first token, and one decoded


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_cancelling_mid_prefill_frees_the_cache(cache):
    engine = _engine(tiny_model(), cache, 8, max_batch_size=2, prefix_caching=False)
    other = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=30))
    engine.step()
    rid = engine.add_request(LONG, SamplingParams(temperature=0, max_tokens=5))
    engine.step()
    engine.step()
    assert engine.cache.seq_length(rid) == 16 and engine.sequences[rid] in engine.prefilling
    assert engine.cancel(rid)
    assert not engine.prefilling and engine.stats(rid).finish_reason == "cancelled"
    if cache == "paged":
        assert rid not in engine.cache.tables
        held = len(engine.cache.tables[other])
        assert engine.cache.available_blocks() == engine.cache.num_blocks - 1 - held
    else:
        assert rid not in engine.cache._slot_of and engine.cache.order(other) == 0
    events = engine.step()
    assert [e.request_id for e in events] == [other]


def test_a_prompt_waits_for_its_twin_and_forks_its_cache():
    engine = _engine(tiny_model(), "paged", 8, max_batch_size=4)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=4) for s in range(3)]
    ids = [engine.add_request(LONG, p) for p in params]
    for _ in range(4):
        engine.step()
    assert engine.sequences[ids[0]] in engine.prefilling and len(engine.waiting) == 2
    engine.step()  # the last chunk: the twins copy its cache instead of prefilling again
    tables = [engine.cache.tables[i] for i in ids]
    assert tables[0][:10] == tables[1][:10] == tables[2][:10]
    while engine.has_unfinished():
        engine.step()
    want = _engine(tiny_model(), "paged", None).complete([LONG] * 3, params)
    assert [engine.sequences[i].output_ids for i in ids] == [w.token_ids for w in want]


def test_a_prompt_under_way_is_preempted_when_decoding_needs_its_blocks():
    """9 usable blocks of 4: the long prompt reserves its 6 at admission; when the two decoding requests
    need more, it goes back to the queue (the most recently admitted), keeps its first full block in the
    prefix cache, and is prefilled again once they finish, with the reply it would have had."""
    model = tiny_model()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = Engine(model, cache="paged", block_size=4, num_blocks=10, max_batch_size=4, prefill_chunk=6)
    a, b = engine.add_request([9, 8, 7], params), engine.add_request([1, 2], params)
    engine.step()
    long = engine.add_request(LONG[:24], params)
    engine.step()
    assert [s.id for s in engine.prefilling] == [long] and engine.cache.seq_length(long) == 6
    engine.step()
    assert not engine.prefilling and [s.id for s in engine.waiting] == [long]
    assert [s.id for s in engine.running] == [a, b]
    while engine.has_unfinished():
        engine.step()
    assert engine.stats(long).cached_tokens == 4  # the first chunk's full block
    want = _engine(model, "paged", None).complete([[9, 8, 7], [1, 2], LONG[:24]], params)
    assert [engine.sequences[i].output_ids for i in (a, b, long)] == [w.token_ids for w in want]
    assert all(r == 0 for r in engine.cache.refs)


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_a_prefix_adapter_with_chunked_prefill(cache):
    model = tiny_model()
    add_prefix(model, PrefixConfig(num_virtual_tokens=3))
    model.eval()
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=True)
    want = _engine(model, cache, None, max_batch_size=2).complete(MIXED[:4], params)
    got = _engine(model, cache, 7, max_batch_size=2).complete(MIXED[:4], params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for w, g in zip(want, got):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)


def test_a_negative_chunk_is_refused():
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        Engine(tiny_model(), prefill_chunk=-1)
