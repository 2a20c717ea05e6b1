"""The engine: continuous batching, cancellation, stops, seeds, logprobs, and clear errors."""

import pytest
import torch

from lmforge.infer.engine import Engine, GenerationError, _StopStrings
from lmforge.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14, 15, 16, 17], [1, 5]]


def _greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_continuous_batching_gives_each_request_its_own_greedy_reply(tiny, variant, cache):
    model = tiny(variant)
    engine = Engine(model, max_batch_size=3, cache=cache, block_size=4, num_blocks=40)
    results = engine.complete(PROMPTS, GREEDY)  # 6 requests through 3 slots: they join as others leave
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == _greedy_by_recomputation(model, prompt, 10)
        assert result.finish_reason == "length" and result.stats.completion_tokens == 10
    assert not engine.running and not engine.waiting


def test_requests_join_and_leave_between_decode_steps(tiny):
    model = tiny()
    engine = Engine(model, max_batch_size=4)
    short = engine.add_request([1, 2], SamplingParams(temperature=0, max_tokens=2))
    long = engine.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=8))
    tokens: dict[int, list[int]] = {short: [], long: []}
    batch_sizes = []
    late = None
    for step in range(20):
        if step == 3:  # arrives while `long` is mid-reply, after `short` has left
            late = engine.add_request([6, 7], SamplingParams(temperature=0, max_tokens=5))
            tokens[late] = []
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
        batch_sizes.append(len(engine.running))
        if not engine.has_unfinished():
            break
    assert tokens[short] == _greedy_by_recomputation(model, [1, 2], 2)
    assert tokens[long] == _greedy_by_recomputation(model, [3, 4, 5], 8)
    assert tokens[late] == _greedy_by_recomputation(model, [6, 7], 5)
    assert 1 in batch_sizes and 2 in batch_sizes  # the batch shrank and grew again


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_cancel_frees_the_cache_at_once(tiny, cache):
    engine = Engine(tiny(), max_batch_size=2, cache=cache, block_size=4, num_blocks=20)
    a = engine.add_request([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=30))
    b = engine.add_request([7, 8], SamplingParams(temperature=0, max_tokens=30))
    for _ in range(3):
        engine.step()
    if cache == "paged":
        used = engine.cache.num_blocks - 1 - engine.cache.available_blocks()
        blocks_of_a = len(engine.cache.tables[a])
        assert engine.cancel(a)  # a's full blocks stay in the prefix cache, idle: available to anyone
        assert engine.cache.available_blocks() == engine.cache.num_blocks - 1 - (used - blocks_of_a)
        assert a not in engine.cache.tables
    else:
        assert engine.cancel(a)
        assert a not in engine.cache._slot_of and engine.cache.order(b) == 0  # b moved into the freed slot
    assert engine.stats(a).finish_reason == "cancelled" and not engine.cancel(a)
    events = engine.step()
    assert [e.request_id for e in events] == [b]


def test_a_cache_grown_mid_decode_still_serves_the_next_requests(tiny):
    """The lazy cache starts at 256 positions and doubles inside the (inference-mode) forward;
    freeing and allocating slots afterwards must still work (a server keeps going)."""
    engine = Engine(tiny(max_seq_len=1024), max_batch_size=2)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    first = engine.complete([[1, 2, 3]], params)[0]
    assert len(first.token_ids) == 300 and engine.cache.key_pos.shape[1] >= 303
    again = engine.complete([[1, 2, 3], [4, 5]], [params, SamplingParams(temperature=0, max_tokens=5)])
    assert again[0].token_ids == first.token_ids


def test_paged_pool_too_small_preempts_and_still_answers_exactly(tiny):
    model = tiny()
    engine = Engine(model, max_batch_size=4, cache="paged", block_size=2, num_blocks=16)  # 30 tokens for 4
    results = engine.complete(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=12))
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == _greedy_by_recomputation(model, prompt, 12)


def test_stop_token_ids_and_ignore_eos(tiny):
    model = tiny()
    reply = _greedy_by_recomputation(model, [1, 2, 3], 10)
    last_new = max(i for i, t in enumerate(reply) if t not in reply[:i])  # a token's first appearance
    engine = Engine(model, stop_ids=[reply[last_new]])
    [result] = engine.complete([[1, 2, 3]], GREEDY)
    assert result.token_ids == reply[:last_new + 1] and result.finish_reason == "stop"
    [result] = engine.complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert result.token_ids == reply
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[reply[last_new]])
    [result] = Engine(model).complete([[1, 2, 3]], params)
    assert result.token_ids == reply[:last_new + 1] and result.finish_reason == "stop"


def _letters(token_id: int) -> bytes:
    return bytes([97 + token_id % 26])  # a toy vocabulary: each token is one letter


def test_stop_strings_cut_the_text_and_hold_back_partial_matches(tiny):
    model = tiny()
    engine = Engine(model, token_bytes=_letters)
    [full] = engine.complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12))
    text = full.text
    stop = text[5:7]
    [result] = engine.complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    assert result.text == text[:text.find(stop)] and result.finish_reason == "stop"

    matcher = _StopStrings(["END", "STOP"])
    assert matcher.feed("abcE") == ("abc", False)  # "E" may start "END": held back
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("x") == ("ENx", False)  # it did not: released
    assert matcher.feed("yST") == ("y", False)
    assert matcher.feed("OP and more") == ("", True)


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(tiny):
    model = tiny()
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=8)
    alone = Engine(model).complete([[1, 2, 3]], params)[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=6) for s in (1, 2)]
    batched = Engine(model).complete([[4, 5], [1, 2, 3], [6]], [others[0], params, others[1]])
    assert batched[1].token_ids == alone
    unseeded = {tuple(Engine(model).complete([[1, 2, 3]], SamplingParams(max_tokens=8))[0].token_ids)
                for _ in range(3)}
    assert len(unseeded) > 1


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_requests_sharing_a_prompt_are_prefilled_once_and_sample_as_if_alone(tiny, cache):
    model = tiny()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = [SamplingParams(temperature=1.0, top_k=20, seed=s, max_tokens=8) for s in range(4)]
    alone = [Engine(model, cache=cache).complete([prompt], p)[0].token_ids for p in params]
    engine = Engine(model, max_batch_size=8, cache=cache, block_size=4, num_blocks=40)
    prompt_forwards: list[int] = []
    engine.runner = _CountingRunner(engine.runner, prompt_forwards)
    together = engine.complete([prompt] * 4 + [[7, 7]], params + [params[0]])
    assert [r.token_ids for r in together[:4]] == alone
    assert len(set(map(tuple, alone))) > 1  # the seeds do give different replies
    assert prompt_forwards == [len(prompt), 2]  # the shared prompt ran once


class _CountingRunner:
    """A `ModelRunner` that records the length of every multi-token forward pass."""

    def __init__(self, runner, lengths: list[int]) -> None:
        self._runner, self._lengths = runner, lengths

    def __call__(self, ids, cache, **kwargs):
        if ids.shape[1] > 1:
            self._lengths.append(ids.shape[1])
        return self._runner(ids, cache, **kwargs)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def test_a_batch_mixing_settings_samples_each_row_as_if_alone(tiny):
    model = tiny()
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=6),
              SamplingParams(temperature=0, max_tokens=6),
              SamplingParams(temperature=1.2, top_k=5, repetition_penalty=1.5, seed=2, max_tokens=6),
              SamplingParams(temperature=1.0, min_p=0.1, frequency_penalty=0.5, seed=3, max_tokens=6)]
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    alone = [Engine(model).complete([q], p)[0].token_ids for q, p in zip(prompts, params)]
    assert [r.token_ids for r in Engine(model).complete(prompts, params)] == alone


def test_logprobs_are_the_models_own(tiny):
    model = tiny()
    engine = Engine(model)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=5, logprobs=True, top_logprobs=3)
    events = list(engine.generate([1, 2, 3], params))
    ids = [1, 2, 3] + [e.token_id for e in events]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    for i, event in enumerate(events):
        row = logp[2 + i]
        assert event.logprob == pytest.approx(float(row[event.token_id]), abs=1e-4)
        assert [t.token_id for t in event.top_logprobs] == row.topk(3).indices.tolist()


def test_penalties_change_the_reply(tiny):
    model = tiny()
    plain = Engine(model).complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=20))[0].token_ids
    penalized = Engine(model).complete([[1, 2, 3]], SamplingParams(
        temperature=0, max_tokens=20, repetition_penalty=5.0, presence_penalty=2.0))[0].token_ids
    assert len(set(penalized)) > len(set(plain))  # fewer repeats


def test_bad_requests_are_clear_errors(tiny):
    engine = Engine(tiny())  # context: 64 tokens
    with pytest.raises(GenerationError, match="empty"):
        engine.add_request([])
    with pytest.raises(GenerationError, match="context is 64"):
        engine.add_request(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(GenerationError, match="max_tokens"):
        engine.add_request([1], SamplingParams(max_tokens=64))
    with pytest.raises(GenerationError, match="token ids"):
        engine.add_request([1, 500])
    with pytest.raises(GenerationError, match="tokenizer"):
        engine.add_request("text needs a tokenizer")
    # truncation keeps the end of the prompt, leaving room for the reply
    rid = engine.add_request(list(range(60)), SamplingParams(temperature=0, max_tokens=10), truncate=True)
    assert engine.sequences[rid].prompt_ids == list(range(6, 60))
    # max_tokens=None: as many as fit
    [result] = Engine(tiny()).complete([list(range(60))], SamplingParams(temperature=0, max_tokens=None,
                                                                         ignore_eos=True))
    assert len(result.token_ids) == 4 and result.finish_reason == "length"


def test_engine_batch_on_smollm2_equals_transformers_greedy(smollm2, hf_smollm2):
    engine = Engine(smollm2.model, smollm2.tokenizer, stop_ids=smollm2.stop_ids(), max_batch_size=2)
    prompts = ["The capital of France is", "def fibonacci(n):"]  # different lengths: a ragged batch
    results = engine.complete(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        ids = smollm2.tokenizer.encode(prompt)
        expected = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert result.token_ids == expected
    assert "Paris" in results[0].text


def test_ids_past_the_tokenizers_vocabulary_print_as_nothing(tiny):
    # models pad their embedding beyond the tokenizer (SmolLM2's 49,152 rows, GPT-2's 50,257
    # padded to 50,304): a sampled model can draw those ids, which have no bytes
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.pretokenize import GPT2_PATTERN

    tokenizer = Tokenizer.from_tiktoken({bytes([97 + i]): i for i in range(26)}, GPT2_PATTERN, {})
    model = tiny()  # 97 ids, 26 of them known to the tokenizer
    [result] = Engine(model, tokenizer).complete([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10))
    assert any(t >= 26 for t in result.token_ids), "the test needs a reply with unknown ids"
    assert result.text == "".join(chr(97 + t) for t in result.token_ids if t < 26)
