"""Pruning: the patterns are exact, and using the data keeps more of the layer's function."""

import pytest
import torch

from lmforge.compress.prune import PruneError, Sparsity, magnitude_mask, sparsegpt, wanda_mask

from .conftest import correlated_inputs


def test_sparsity_parses_fractions_and_n_m_patterns():
    assert Sparsity.parse("0.5") == Sparsity(0.5)
    assert Sparsity.parse("2:4") == Sparsity(0.5, 2, 4)
    for bad in ("1.5", "0", "4:2", "half"):
        with pytest.raises(PruneError):
            Sparsity.parse(bad)


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.25"])
def test_every_method_prunes_exactly_what_was_asked(pattern):
    sparsity = Sparsity.parse(pattern)
    weight = torch.randn(32, 64)
    x = correlated_inputs(1024, 64)
    masks = {"magnitude": magnitude_mask(weight, sparsity),
             "wanda": wanda_mask(weight, x.square().sum(0), sparsity),
             "sparsegpt": sparsegpt(weight, 2 * x.T @ x / 1024, sparsity) == 0}
    for name, mask in masks.items():
        assert mask.float().mean() == pytest.approx(sparsity.fraction, abs=0.01), name
        if sparsity.structured:  # exactly n zeros in every run of m inputs of every row
            assert (mask.view(32, -1, 4).sum(-1) == 2).all(), name
    # Wanda keeps the same share in every output row
    assert (masks["wanda"].sum(1) == masks["wanda"].sum(1)[0]).all()


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_wanda_and_sparsegpt_keep_more_of_the_outputs_than_magnitude(pattern):
    torch.manual_seed(0)
    sparsity = Sparsity.parse(pattern)
    weight = torch.randn(64, 128)
    x = correlated_inputs(4096, 128)
    reference = x @ weight.T

    def error(w):
        return float((x @ w.T - reference).square().mean())

    magnitude = error(weight.masked_fill(magnitude_mask(weight, sparsity), 0))
    wanda = error(weight.masked_fill(wanda_mask(weight, x.square().sum(0), sparsity), 0))
    obs = error(sparsegpt(weight, 2 * x.T @ x / x.shape[0], sparsity))
    assert wanda < 0.5 * magnitude
    assert obs < wanda


def test_a_pattern_that_does_not_fit_the_layer_is_a_clear_error():
    with pytest.raises(PruneError, match="runs of 3"):
        magnitude_mask(torch.randn(4, 64), Sparsity.parse("1:3"))
