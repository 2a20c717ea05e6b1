"""Prefix caching: a prompt's leading tokens that an earlier request computed are reused (whole blocks of the
paged cache; any length from a free static slot), and the output is exactly what computing them again gives;
shared blocks are counted, kept until evicted, and forgotten when the weights change."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=True)


def _run(engine: Engine, prompt: list[int],
         params: SamplingParams = GREEDY) -> tuple[list[int], list[float], int]:
    """(tokens, logprobs, prompt tokens served from the cache) of one request run to the end."""
    rid = engine.add_request(prompt, params)
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for event in engine.step():
            if event.request_id == rid:
                tokens.append(event.token_id)
                logprobs.append(event.logprob)
    return tokens, logprobs, engine.stats(rid).cached_tokens


def _engines(tiny, cache: str = "paged", **kwargs) -> tuple[Engine, Engine]:
    model = tiny()
    options = {"block_size": 4, "num_blocks": 64} if cache == "paged" else {}
    return (Engine(model, cache=cache, **options, **kwargs),
            Engine(model, cache=cache, **options, prefix_caching=False, **kwargs))


@pytest.mark.parametrize("cache", ["paged", "static"])
def test_a_repeated_prefix_is_reused_and_gives_the_same_tokens_and_logprobs(tiny, cache):
    cached, fresh = _engines(tiny, cache)
    system = list(range(1, 15))  # 14 tokens: three full blocks of 4
    first = _run(cached, system + [20, 21])
    second = _run(cached, system + [30, 31, 32])
    # paged: 3 blocks (the 4th is partial: tokens 13, 14, 30, 31); static: every shared token
    assert first[2] == 0 and second[2] == (12 if cache == "paged" else 14)
    for got, prompt in ((first, system + [20, 21]), (second, system + [30, 31, 32])):
        want = _run(fresh, prompt)
        assert want[2] == 0 and got[0] == want[0]
        assert got[1] == pytest.approx(want[1], abs=1e-5)


@pytest.mark.parametrize("cache", ["paged", "static"])
def test_a_conversations_second_turn_reuses_the_first_turn_and_its_reply(tiny, cache):
    cached, fresh = _engines(tiny, cache)
    turn1 = list(range(1, 23))
    reply, _, _ = _run(cached, turn1)
    turn2 = turn1 + reply + [40, 41, 42]
    got = _run(cached, turn2)
    # the reply's last token was sampled but never run through the model: not cached
    held = len(turn1) + len(reply) - 1
    assert got[2] == (held // 4 * 4 if cache == "paged" else held)
    assert got[0] == _run(fresh, turn2)[0]


def test_a_static_slot_another_sequence_moved_into_is_not_reused(tiny):
    cached, fresh = _engines(tiny, "static", max_batch_size=2)
    a = cached.add_request(list(range(1, 9)), SamplingParams(temperature=0, max_tokens=2))
    b = cached.add_request(list(range(30, 40)), SamplingParams(temperature=0, max_tokens=6))
    while not cached.sequences[a].finished:
        cached.step()
    assert cached.cache.order(b) == 0  # b moved into a's slot: a's tokens are gone from there
    c = cached.add_request(list(range(1, 9)) + [50], SamplingParams(temperature=0, max_tokens=3))
    tokens = {a: [], b: [], c: []}
    while cached.has_unfinished():
        for event in cached.step():
            tokens[event.request_id].append(event.token_id)
    assert cached.stats(c).cached_tokens == 0
    assert tokens[c] == _run(fresh, list(range(1, 9)) + [50], SamplingParams(temperature=0, max_tokens=3))[0]


def test_a_whole_prompt_in_the_cache_still_runs_its_last_block_for_the_next_token(tiny):
    cached, fresh = _engines(tiny)
    prompt = list(range(1, 17))  # exactly four blocks
    _run(cached, prompt)
    again = _run(cached, prompt)
    assert again[2] == 12 and again[0] == _run(fresh, prompt)[0]


def test_samples_of_one_prompt_share_its_blocks_and_release_them(tiny):
    model = tiny()
    engine = Engine(model, cache="paged", block_size=4, num_blocks=64, max_batch_size=4)
    prompt = list(range(1, 11))  # two full blocks and a partial one
    ids = [engine.add_request(prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=3))
           for seed in range(3)]
    engine.step()
    tables = [engine.cache.tables[i] for i in ids]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # shared full blocks ...
    assert len({t[2] for t in tables}) == 3  # ... and a copy each of the block they go on writing
    assert engine.cache.refs[tables[0][0]] == 3
    while engine.has_unfinished():
        engine.step()
    assert all(r == 0 for r in engine.cache.refs)
    assert engine.cache.available_blocks() == engine.cache.num_blocks - 1


def test_idle_cached_blocks_are_evicted_least_recently_used_first_when_blocks_run_out(tiny):
    model = tiny()
    engine = Engine(model, cache="paged", block_size=4, num_blocks=9, max_batch_size=1)  # 8 usable blocks
    fresh = Engine(model, cache="paged", block_size=4, num_blocks=9, prefix_caching=False)
    old, newer = list(range(1, 13)), list(range(50, 62))
    short = SamplingParams(temperature=0, max_tokens=2)
    _run(engine, old, short)
    _run(engine, newer, short)
    assert engine.cache.available_blocks() == 8 and len(engine.cache.idle) == 6
    big = list(range(70, 90))  # 20 tokens + 2: six blocks, more than the two free ones
    assert _run(engine, big, short)[0] == _run(fresh, big, short)[0]
    assert _run(engine, newer, short)[2] == 8  # the most recently used survived ...
    assert _run(engine, old, short)[2] == 0  # ... the least recently used was evicted


def test_changed_weights_forget_the_cached_blocks(tiny):
    model = tiny()
    engine = Engine(model, cache="paged", block_size=4, num_blocks=64)
    prompt = list(range(1, 14))
    _run(engine, prompt)
    with torch.no_grad():  # in place, as an optimizer step between RL rollouts changes them
        next(p for p in model.blocks[0].parameters() if p.dim() == 2).mul_(1.5)
    after = _run(engine, prompt)
    assert after[2] == 0
    assert after[0] == _run(Engine(model, cache="paged", block_size=4, num_blocks=64), prompt)[0]
