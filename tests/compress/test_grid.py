"""The grids: what they store is exactly what the engine's layers compute with."""

import pytest
import torch

from lmforge.compress.grid import Grid, GridError
from lmforge.infer.quant import Int4Linear, Int8Linear


def test_4_bit_rtn_in_groups_of_32_is_the_engines_own_int4_rounding():
    w = torch.randn(48, 128)
    codes, step, offset = Grid(4, 32).rtn(w)
    reference = Int4Linear.from_float(w, group_size=32)
    assert torch.equal(codes.to(torch.uint8), reference.unpack())
    assert torch.equal(Grid(4, 32).layer(codes, step, offset).dequantize(), reference.dequantize())


def test_8_bit_rtn_is_the_engines_int8_rounding():
    w = torch.randn(40, 64)
    codes, step, offset = Grid(8).rtn(w)
    layer = Grid(8).layer(codes, step, offset)
    assert isinstance(layer, Int8Linear)
    assert torch.equal(layer.qweight, Int8Linear.from_float(w).qweight)
    assert torch.equal(layer.dequantize(), Grid(8).dequantize(codes, step, offset))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fewer_bits_use_fewer_codes_and_lose_more(bits):
    w = torch.randn(32, 128)
    grid = Grid(bits, 64)
    codes, step, offset = grid.rtn(w)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
    layer = grid.layer(codes, step, offset)
    assert isinstance(layer, Int4Linear)  # 2 and 3 bits live in the 4-bit layer
    assert torch.equal(layer.dequantize(), grid.dequantize(codes, step, offset))
    error = (grid.dequantize(codes, step, offset) - w).square().mean()
    finer = Grid(bits + 1, 64) if bits < 4 else None
    if finer is not None:
        assert (finer.dequantize(*finer.rtn(w)) - w).square().mean() < error


def test_groups_that_do_not_fit_are_clear_errors():
    with pytest.raises(GridError, match="multiple of 32"):
        Grid(4, 48)
    with pytest.raises(GridError, match="bits"):
        Grid(5)
    with pytest.raises(GridError, match="576 inputs cannot be cut into groups of 128"):
        Grid(4, 128).rtn(torch.randn(4, 576))
