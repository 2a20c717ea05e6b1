"""NF4 with double quantization: the bytes bitsandbytes writes on a CPU, and bitsandbytes reads ours."""

from __future__ import annotations

import pytest
import torch

from lmforge.tune.nf4 import BLOCK, dynamic_code, nf4_code, quantize_nf4

SHAPES = [(128, 256), (576, 576), (64, 1536), (1000, 64), (3, 64)]


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference")


def test_the_codes_are_the_published_ones(bnb):
    assert torch.equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map(signed=True))
    assert nf4_code()[7] == 0 and nf4_code()[0] == -1 and nf4_code()[-1] == 1  # an exact zero, full range


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0])
def test_bytes_equal_bitsandbytes(bnb, shape, scale):
    torch.manual_seed(hash((shape, scale)) % 2**31)
    w = torch.randn(shape) * scale
    ours = quantize_nf4(w)
    packed, state = bnb.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.view(-1))  # every 4-bit code
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.absmax_scales, state.state2.absmax)
    # the absmaxes' 8-bit codes: bitsandbytes' portable kernel (the nearest code; see tune/nf4.py for its
    # native CPU kernel, which sometimes picks a neighbour)
    absmax = w.reshape(-1, BLOCK).abs().max(dim=1).values
    reference = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd),
        absmax - absmax.mean(), bnb.create_dynamic_map(), 256)
    assert torch.equal(ours.absmax_codes, reference[0]) and torch.equal(ours.absmax_scales, reference[1])
    # bitsandbytes reads our bytes and gets our numbers
    ours_in_theirs = bnb.QuantState(absmax=ours.absmax_codes, shape=state.shape, dtype=state.dtype,
                                    blocksize=BLOCK, code=state.code, quant_type="nf4", offset=ours.offset,
                                    state2=state.state2)
    assert torch.equal(bnb.dequantize_4bit(packed, ours_in_theirs), ours.dequantize())


def test_error_and_size():
    torch.manual_seed(0)
    w = torch.randn(576, 576) * 0.02
    q = quantize_nf4(w)
    assert q.nbytes / (w.numel() * 4) < 0.13  # 4.127 bits per weight of fp32's 32
    relative = (q.dequantize() - w).norm() / w.norm()
    assert 0.05 < relative < 0.12  # 16 levels: about 9% error on Gaussian weights
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_nf4(torch.randn(3, 10))
