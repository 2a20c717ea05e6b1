import pytest
import torch

from lmforge.infer.sampling import (
    SamplingError,
    SamplingParams,
    TokenCounts,
    apply_penalties,
    draw,
    filter_logits,
    logprobs_of,
    probabilities,
    sample,
)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams(temperature=0), None).tolist() == [1, 0]


def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, 50)
    kept = filter_logits(logits, SamplingParams(top_k=5)).isfinite().sum(-1)
    assert kept.tolist() == [5, 5, 5, 5]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    filtered = filter_logits(probs.log(), SamplingParams(top_p=0.8))
    assert filtered.isfinite().tolist() == [[True, True, False, False]]
    filtered = filter_logits(probs.log(), SamplingParams(top_p=0.81))
    assert filtered.isfinite().tolist() == [[True, True, True, False]]
    # the most likely token always survives, however small p is
    assert filter_logits(probs.log(), SamplingParams(top_p=0.01)).isfinite().sum() == 1


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), gen), minlength=3)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1) * 20000
    assert torch.allclose(counts.float(), expected, rtol=0.05)
    a = sample(logits[:10], SamplingParams(), torch.Generator().manual_seed(7))
    b = sample(logits[:10], SamplingParams(), torch.Generator().manual_seed(7))
    assert a.tolist() == b.tolist()


def test_draw_gives_each_row_its_own_generator_and_never_a_zero_probability_token():
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0], [2.0, 0.0, 2.0, 0.0]])  # not normalised
    counts = torch.zeros(2, 4)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    for _ in range(4000):
        tokens = draw(weights, gens)
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
    assert counts[0, 0] == counts[0, 2] == counts[1, 1] == counts[1, 3] == 0
    assert counts[0, 1] / 4000 == pytest.approx(0.75, abs=0.03)
    assert counts[1, 0] / 4000 == pytest.approx(0.5, abs=0.03)
    # row 1's draws depend on its own generator only, not on what row 0 holds or draws
    alone = draw(weights[1:], [torch.Generator().manual_seed(5)])
    paired = draw(weights[[0, 1]], [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)])
    assert int(paired[1]) == int(alone[0])
    with pytest.raises(ValueError, match="generators"):
        draw(weights, gens[:1])
    for bad in ([[float("nan"), 1.0]], [[0.0, 0.0]], [[-1.0, 2.0]], [[float("inf"), 1.0]]):
        with pytest.raises(ValueError, match="cannot sample"):
            draw(torch.tensor(bad), gens[:1])


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def test_min_p_keeps_tokens_near_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), SamplingParams(min_p=0.25)).isfinite()
    assert kept.tolist() == [[True, True, True, False]]  # threshold 0.25 * 0.5 = 0.125
    kept = filter_logits(probs.log(), SamplingParams(min_p=1.0)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    counts = TokenCounts(4, prompt_ids=[0, 1])
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), counts)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]  # only tokens seen in the prompt are touched


def test_frequency_and_presence_penalties_count_generated_tokens():
    counts = TokenCounts(3, prompt_ids=[2])  # the prompt does not count for these two
    for token in (0, 0, 1):
        counts.add(token)
    out = apply_penalties(torch.zeros(3), SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), counts)
    assert out.tolist() == [-2.0, -1.5, 0.0]


def test_penalties_apply_to_greedy_too():
    counts = TokenCounts(3, prompt_ids=[0])
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sample(logits, SamplingParams(temperature=0), None, counts).tolist() == [0]
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), None, counts).tolist() == [1]


def test_probabilities_is_the_distribution_sampled_from():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    p = probabilities(logits, SamplingParams(temperature=0.5, top_k=2))
    assert p[2] + p[1] == pytest.approx(1.0) and p[0] == 0 and p[3] == 0
    assert probabilities(logits, SamplingParams(temperature=0)).tolist() == [0, 0, 1, 0]


def test_logprobs_of_reports_the_raw_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0])
    lp, top = logprobs_of(logits, 1, 2)
    expected = torch.log_softmax(logits, -1)
    assert lp == pytest.approx(float(expected[1]))
    assert [t.token_id for t in top] == [2, 1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0), dict(frequency_penalty=3),
     dict(presence_penalty=-2.5), dict(max_tokens=0), dict(top_logprobs=-1), dict(temperature=float("nan")),
     dict(stop=("",))],
)
def test_more_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)
