"""ggml block encoders: Q4_0/Q4_1/Q8_0 byte for byte as gguf-py's reference quantizers, Q4_K
through gguf-py's dequantizer and within its grid's error (tests/model/test_gguf_llamacpp.py
checks all four byte for byte against llama.cpp's own quantizer)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from lmforge.formats.ggml import (
    QUANTIZERS,
    GGMLError,
    GGMLType,
    decode_q4,
    decode_q8_0,
    dequantize,
    encode_q4_0,
    encode_q4_k,
    encode_q8_0,
    fit_scale_min,
    quantize_q4_k,
)


def weights(rows: int = 12, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows with the blocks that trip reference code: all zero, all equal, one outlier,
    only positive, only negative, and ties of the rounding."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0
    w[0, 32:64] = 0.25
    w[1, :32] *= 0.01
    w[1, 5] = 7.0
    w[2, :256] = np.abs(w[2, :256]) + 0.1
    w[3, :256] = -np.abs(w[3, :256]) - 0.1
    w[4, :32] = np.arange(-16, 16) / 2  # steps of 1/2: many values land on .5 between codes
    w[5] *= 1e-3
    return w


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantizers_write_gguf_reference_bytes(kind):
    w = weights()
    ours = QUANTIZERS[GGMLType[kind]](w)
    assert np.array_equal(ours, gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]))
    # and 3-D stacks (MoE experts) row by row
    stack = w.reshape(3, 4, -1)
    assert np.array_equal(QUANTIZERS[GGMLType[kind]](stack).reshape(12, -1), ours)


def test_q4_k_decodes_through_gguf_and_keeps_its_grids_error():
    w = weights()
    blocks = quantize_q4_k(w)
    assert blocks.shape == (12, 2 * 144)
    ours = dequantize(blocks, GGMLType.Q4_K, w.shape)
    assert np.array_equal(ours, gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K))
    assert np.array_equal(ours[0, :32], np.zeros(32))  # an all-zero sub-block stays exactly zero
    # weights inside the grid's reach round to the nearest of its points (half a step); those the
    # searched, 6-bit rounded range cuts off are clamped to its end (gguf-py unpacks the scales)
    raw = blocks.reshape(-1, 144)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    sc, _ = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16].copy())
    relative = np.abs(ours - w).reshape(12, 2, 8, 32) / np.maximum(d * sc, 1e-30).reshape(12, 2, 8, 1)
    assert (relative <= 0.5 + 1e-3).mean() > 0.995 and relative.max() < 1.5
    plain = dequantize(QUANTIZERS[GGMLType.Q4_1](w[6:]), GGMLType.Q4_1, w[6:].shape)
    assert np.sqrt(((ours[6:] - w[6:]) ** 2).mean()) < np.sqrt(((plain - w[6:]) ** 2).mean())


def test_the_scale_search_beats_the_plain_range_and_clamps_the_offset():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    importance = np.abs(x) + 1
    scale, low, codes = fit_scale_min(x, importance)
    plain_scale = (x.max(1) - x.min(1)) / 15
    plain = np.clip(np.rint((x - x.min(1, keepdims=True)) / plain_scale[:, None]), 0, 15)
    searched = (importance * (scale[:, None] * codes - low[:, None] - x) ** 2).sum(1)
    full_range = (importance * (plain_scale[:, None] * plain + x.min(1, keepdims=True) - x) ** 2).sum(1)
    assert (searched <= full_range * (1 + 1e-5)).all() and searched.mean() < 0.9 * full_range.mean()
    assert (low >= 0).all()  # w ~ scale * q - low: the grid never starts above zero
    positive = np.abs(x[:4]) + 1
    scale, low, codes = fit_scale_min(positive, np.ones_like(positive))
    error = np.abs(scale[:, None] * codes - low[:, None] - positive)
    assert (low >= 0).all() and (error <= scale[:, None]).all()


def test_block_encoders_invert_the_decoders():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (6, 64)).astype(np.uint8)
    step = rng.random((6, 2)).astype(np.float16).astype(np.float32)
    c, s, o = decode_q4(encode_q4_0(codes, step), GGMLType.Q4_0, 6, 64)
    assert np.array_equal(c, codes) and np.array_equal(s, step) and np.array_equal(o, -8 * step)
    q8 = rng.integers(-128, 128, (6, 64)).astype(np.int8)
    c8, s8 = decode_q8_0(encode_q8_0(q8, step), 6, 64)
    assert np.array_equal(c8, q8) and np.array_equal(s8, step)
    k_codes = rng.integers(0, 16, (3, 256)).astype(np.uint8)
    sc, mn = (rng.integers(0, 64, (3, 8)).astype(np.uint8) for _ in range(2))
    d, dmin = np.float32([0.5, 0.25, 2.0]), np.float32([0.125, 1.0, 0.0])
    w = dequantize(encode_q4_k(k_codes, sc, mn, d, dmin), GGMLType.Q4_K, (3, 256)).reshape(3, 8, 32)
    expected = (d[:, None] * sc)[..., None] * k_codes.reshape(3, 8, 32) - (dmin[:, None] * mn)[..., None]
    assert np.array_equal(w, expected)


def test_rows_the_blocks_do_not_divide_are_refused():
    with pytest.raises(GGMLError, match="multiple of 256"):
        quantize_q4_k(np.zeros((2, 288), np.float32))
    with pytest.raises(GGMLError, match="multiple of 32"):
        QUANTIZERS[GGMLType.Q4_0](np.zeros((2, 40), np.float32))
    with pytest.raises(GGMLError, match="6-bit"):
        encode_q4_k(np.zeros((1, 256)), np.full((1, 8), 64), np.zeros((1, 8)), [1.0], [0.0])
