import pytest
import torch

from lmforge.infer.sampling import SamplingError, SamplingParams, filter_logits, sample


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


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)
