"""Speculative decoding keeps the model's output distribution; greedy gives identical tokens."""

import copy

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.quant import quantize_model
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
