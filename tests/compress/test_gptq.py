"""GPTQ against the textbook algorithm it accelerates, and against rounding to nearest."""

import pytest
import torch

from lmforge.compress.gptq import gptq
from lmforge.compress.grid import Grid, GridError

from .conftest import correlated_inputs


def textbook_obq(weight, hessian, grid, damp):
    """Optimal Brain Quantization column by column, in float64: after rounding column j, update the
    remaining columns by -err / Hinv_jj * Hinv_j,: and remove j from Hinv by Gaussian elimination.
    No Cholesky factor, no blocks: the definition GPTQ's fast form must reproduce."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    g = grid.group_of(w.shape[1])
    codes = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % g == 0:
            step, offset = grid.fit(w[:, j:j + g].float())
        q = grid.codes(w[:, j].float(), step, offset)
        codes[:, j] = q
        error = (w[:, j] - (q * step + offset).double()) / hinv[j, j]
        w[:, j:] -= error[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


def output_error(weight, dequantized, x):
    return float((x @ weight.T - x @ dequantized.T).square().mean())


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (8, 64)])
def test_gptq_equals_the_textbook_column_by_column_algorithm(bits, group):
    torch.manual_seed(0)
    weight = torch.randn(24, 128)
    x = correlated_inputs(2048, 128)
    hessian = 2 * x.T @ x / x.shape[0]
    grid = Grid(bits, group)
    fast = gptq(weight, hessian, grid, block_size=32)
    slow = textbook_obq(weight, hessian, grid, 0.01)
    agree = (fast.codes == slow).float().mean()
    assert agree > 0.99, agree  # float32 vs float64: a rare near-tie may round the other way


def test_gptq_beats_round_to_nearest_on_the_outputs_and_act_order_keeps_the_layout():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    x = correlated_inputs(4096, 128)
    hessian = 2 * x.T @ x / x.shape[0]
    grid = Grid(3, 32)
    rtn = output_error(weight, grid.dequantize(*grid.rtn(weight)), x)
    plain = gptq(weight, hessian, grid)
    ordered = gptq(weight, hessian, grid, act_order=True)
    plain_error = output_error(weight, grid.dequantize(plain.codes, plain.step, plain.offset), x)
    ordered_error = output_error(weight, grid.dequantize(ordered.codes, ordered.step, ordered.offset), x)
    assert plain_error < 0.5 * rtn
    assert ordered_error < 0.5 * rtn
    # act-order's groups are fitted on the original weights, in contiguous runs of 32 inputs: every
    # code of a group lies on that group's grid as fitted before the walk
    static_step, static_offset = grid.fit(weight[:, 32:64])
    assert torch.allclose(ordered.step[:, 1], static_step)
    assert torch.allclose(ordered.offset[:, 1], static_offset)


def test_with_uncorrelated_unit_inputs_gptq_is_round_to_nearest():
    """H = I: no column can absorb another's error, so every correction is zero."""
    weight = torch.randn(16, 64)
    grid = Grid(4, 32)
    result = gptq(weight, torch.eye(64) * 2, grid)
    codes, step, offset = grid.rtn(weight)
    assert torch.equal(result.codes, codes)


def test_dead_input_channels_are_zeroed_not_a_failed_cholesky():
    weight = torch.randn(8, 64)
    x = correlated_inputs(512, 64)
    x[:, 5] = 0.0  # an input that is always zero: H has a zero row and column
    grid = Grid(4, 32)
    result = gptq(weight, 2 * x.T @ x / 512, grid, damp=0.0)  # without the dead-input rule: not factorable
    w = grid.dequantize(result.codes, result.step, result.offset)
    assert (w[:, 5].abs() <= result.step[:, 0] / 2 + 1e-6).all()  # its weights rounded from zero


def test_a_hessian_that_cannot_be_factored_is_a_clear_error():
    h = -torch.eye(64)  # not positive definite at all
    with pytest.raises(GridError, match="not positive definite"):
        gptq(torch.randn(4, 64), h, Grid(4, 32))
