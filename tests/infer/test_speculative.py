"""Speculative decoding keeps the model's output distribution; greedy gives identical tokens."""

import copy

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.quant import quantize_model
from lmforge.infer.runner import ModelRunner
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import accept_drafts


def test_accept_reject_rule_reproduces_the_target_distribution():
    """First emitted token: a draft d ~ q accepted with min(1, p/q), else a draw from max(0, p - q)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2]])
    n = 20000
    counts = torch.zeros(5)
    accepted_total = 0
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        accepted, following = accept_drafts(p, q, [d], gen)
        counts[d if accepted else following] += 1
        accepted_total += accepted
    assert torch.allclose(counts / n, p[0], atol=0.012)
    # the acceptance rate is sum_x min(p, q)
    assert accepted_total / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.012)


def test_greedy_rule_keeps_exactly_the_argmax_prefix():
    p = torch.eye(4)[[2, 0, 3, 1]]  # the model's argmax at each position: 2, 0, 3, then 1
    assert accept_drafts(p, None, [2, 0, 1]) == (2, 3)
    assert accept_drafts(p, None, [2, 0, 3]) == (3, 1)  # all accepted: a bonus token
    assert accept_drafts(p, None, [1, 0, 3]) == (0, 2)


def test_greedy_speculation_with_a_poor_draft_gives_identical_tokens(tiny):
    model, draft = tiny(seed=0), tiny(seed=1)  # an unrelated draft: many rejections
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = Engine(model).complete([[1, 2, 3]], params)[0]
    spec = Engine(model, draft_model=draft, num_speculative=3).complete([[1, 2, 3]], params)[0]
    assert spec.token_ids == plain.token_ids
    assert spec.stats.draft_tokens > 0 and spec.stats.acceptance_rate < 1.0


def test_sampling_with_a_perfect_draft_accepts_everything(tiny):
    model = tiny()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20)
    result = Engine(model, draft_model=model).complete([[1, 2, 3]], params)[0]
    assert result.stats.acceptance_rate == 1.0 and len(result.token_ids) == 20
    again = Engine(model, draft_model=model).complete([[1, 2, 3]], params)[0]
    assert again.token_ids == result.token_ids  # seeded: reproducible


def test_speculation_resumes_after_batched_steps_and_respects_penalties(tiny):
    model, draft = tiny(seed=0), tiny(seed=2)
    params = [SamplingParams(temperature=0, max_tokens=n, repetition_penalty=1.5) for n in (4, 16)]
    plain = Engine(model).complete([[5, 6], [1, 2, 3]], params)
    spec = Engine(model, draft_model=draft).complete([[5, 6], [1, 2, 3]], params)  # batch of 2, then solo
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert spec[1].stats.draft_tokens > 0


def test_smollm2_with_its_int4_self_as_draft(smollm2):
    """A real pair: SmolLM2 fp32 checked against SmolLM2 int4 (group 32) as the draft."""
    draft = quantize_model(copy.deepcopy(smollm2.model), "int4")
    tok = smollm2.tokenizer
    prompt = tok.encode("The three primary colors are")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = Engine(smollm2.model, tok).complete([prompt], params)[0]
    spec = Engine(smollm2.model, tok, draft_model=draft).complete([prompt], params)[0]
    assert spec.token_ids == plain.token_ids
    assert spec.stats.acceptance_rate > 0.6


@pytest.mark.parametrize("cache", ["static", "paged"])
def test_several_requests_are_speculated_together_with_greedy_tokens_unchanged(tiny, cache, monkeypatch):
    """One batched draft forward per draft token and one verification forward for all running requests;
    each request accepts its own drafts, and its tokens are plain greedy decoding's."""
    model, draft = tiny(seed=0), tiny(seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14, 15, 16, 17], [1, 2, 3]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 9, 17, 30, 5, 24)]
    options = {"block_size": 4, "num_blocks": 80} if cache == "paged" else {}
    plain = Engine(model, cache=cache, **options).complete(prompts, params)
    engine = Engine(model, cache=cache, draft_model=draft, num_speculative=3, max_batch_size=4, **options)
    calls = []
    forward = ModelRunner.__call__
    monkeypatch.setattr(ModelRunner, "__call__", lambda self, ids, *a, **kw: calls.append(tuple(ids.shape))
                        or forward(self, ids, *a, **kw))
    spec = engine.complete(prompts, params)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert (4, 4) in calls  # four requests verified together: [last token, 3 drafts] each
    assert all(r.stats.draft_tokens > 0 for r in spec)


def test_seeded_sampling_speculated_together_equals_each_request_alone(tiny):
    model, draft = tiny(seed=0), tiny(seed=2)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3]]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=14, ignore_eos=True,
                             frequency_penalty=0.5 * (s % 2)) for s in range(4)]
    together = Engine(model, draft_model=draft, num_speculative=3).complete(prompts, params)
    alone = [Engine(model, draft_model=draft, num_speculative=3).complete([p], [sp])[0]
             for p, sp in zip(prompts, params)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert sum(r.stats.accepted_tokens for r in together) > 0


def test_speculation_beside_chunked_prefill(tiny):
    """Running requests are speculated while a long prompt is prefilled in chunks beside them."""
    model, draft = tiny(seed=0), tiny(seed=1)
    prompts = [[1, 2], list(range(3, 43)), [5, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = Engine(model, prefill_chunk=None).complete(prompts, params)
    spec = Engine(model, draft_model=draft, num_speculative=2, prefill_chunk=8).complete(prompts, params)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
