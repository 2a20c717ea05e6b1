"""ggml's tensor element types and their block formats (what GGUF files store).

Quantized types pack 32 or 256 weights into a block with shared scales; dequantizing is
one vectorized numpy expression per type, bit-exact with gguf-py's. `BLOCK_LAYOUT` sizes
every type, even the ones lmforge cannot decode, so a file's layout can be checked.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import numpy as np


class GGMLError(ValueError):
    """Bytes that are not a valid tensor of the stated ggml type, or a type lmforge cannot decode."""


class GGMLType(enum.IntEnum):
    """Tensor element types (ggml's `ggml_type`); gaps are ids retired by ggml."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (weights per block, bytes per block): needed to size every tensor, even ones we cannot decode.
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36), GGMLType.IQ4_NL: (32, 18), GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36), GGMLType.Q1_0: (128, 18),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56), GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
}


def tensor_nbytes(ggml_type: GGMLType, shape: Sequence[int]) -> int:
    """Bytes a tensor of this type and shape occupies (its innermost dim must fill whole blocks)."""
    block, block_bytes = BLOCK_LAYOUT[ggml_type]
    n = math.prod(int(d) for d in shape)  # Python ints: a file's 2**32 x 2**32 must not wrap to 0 in int64
    return n // block * block_bytes


# --------------------------------------------------------------------------- block formats
# Each dequantizer maps blocks [n, block_bytes] (uint8) to weights [n, block_size] (float32).


def _f16(column: np.ndarray) -> np.ndarray:
    """A [n, 2] byte column holding one float16 per block, as float32 [n, 1]."""
    return np.ascontiguousarray(column).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., k] bytes -> float32 [..., 2, k]: the low nibbles of all k bytes, then the high ones."""
    out = np.empty((*packed.shape[:-1], 2, packed.shape[-1]), dtype=np.float32)
    np.bitwise_and(packed, 0x0F, out=out[..., 0, :], casting="unsafe")
    np.right_shift(packed, 4, out=out[..., 1, :], casting="unsafe")
    return out


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: scale d (f16), 32 int8 weights; w = d * q."""
    return np.multiply(blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), dtype=np.float32)


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: scale d (f16), 16 bytes: weights 0..15 in low nibbles, 16..31 in high; w = d * (q - 8)."""
    d = _f16(blocks[:, :2])
    return ((_nibbles(blocks[:, 2:]) - 8) * d[:, :, None]).reshape(-1, 32)


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: scale d and minimum m (f16), then 16 bytes of nibbles as in Q4_0; w = d * q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    w = _nibbles(blocks[:, 4:])
    w *= d[:, :, None]
    w += m[:, :, None]
    return w.reshape(-1, 32)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (sub-blocks 4..7 borrow the top bits of 0..3)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 256 weights in 8 sub-blocks of 32, each with its own 6-bit scale and min.

    Layout: d, dmin (f16), 12 bytes of packed scales/mins, 128 bytes of nibbles. Each run
    of 32 bytes holds two sub-blocks: low nibbles the first, high nibbles the second.
    w = d * scale_j * q - dmin * min_j.
    """
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _q4_k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(n, 256)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 256 six-bit weights, 16 int8 scales (one per 16 weights), one f16 super-scale d.

    Layout: 128 bytes of low nibbles (ql), 64 bytes of high 2-bit pairs (qh), scales, d.
    Each half of the block (128 weights) uses 64 ql bytes and 32 qh bytes: weight
    32*j + l of the half takes nibble (j // 2) of ql[32*(j % 2) + l] and bits 2j..2j+1
    of qh[l]; w = d * scale * (q - 32).
    """
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 2, 32)  # half, nibble, ql run, l
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # j = 2 * nibble + run
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(n, 16, 16)
    return ((d * scales)[:, :, None] * q).reshape(n, 256)


def _from_blocks(decode: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, GGMLType], np.ndarray]:
    def run(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
        block_bytes = BLOCK_LAYOUT[ggml_type][1]
        return decode(raw.reshape(-1, block_bytes)).reshape(-1)
    return run


def _bf16(raw: np.ndarray, _: GGMLType) -> np.ndarray:
    """bfloat16 is the top half of a float32."""
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


DEQUANTIZERS: dict[GGMLType, Callable[[np.ndarray, GGMLType], np.ndarray]] = {
    GGMLType.F32: lambda raw, _: raw.view("<f4"),
    GGMLType.F16: lambda raw, _: raw.view("<f2").astype(np.float32),
    GGMLType.BF16: _bf16,
    GGMLType.Q8_0: _from_blocks(_dequant_q8_0),
    GGMLType.Q4_0: _from_blocks(_dequant_q4_0),
    GGMLType.Q4_1: _from_blocks(_dequant_q4_1),
    GGMLType.Q4_K: _from_blocks(_dequant_q4_k),
    GGMLType.Q6_K: _from_blocks(_dequant_q6_k),
}


def dequantize(raw: np.ndarray | bytes, ggml_type: GGMLType, shape: Sequence[int]) -> np.ndarray:
    """Decode a tensor's stored bytes into float32 of the given (PyTorch-order) shape."""
    ggml_type = GGMLType(ggml_type)
    if ggml_type not in DEQUANTIZERS:
        raise GGMLError(f"cannot dequantize ggml type {ggml_type.name} "
                        f"(supported: {', '.join(t.name for t in DEQUANTIZERS)})")
    data = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes | bytearray) else raw
    data = np.ascontiguousarray(data).view(np.uint8).ravel()
    expected = tensor_nbytes(ggml_type, shape)
    if data.size != expected:
        raise GGMLError(f"{ggml_type.name} tensor of shape {tuple(shape)} needs {expected} bytes, "
                        f"got {data.size}")
    return DEQUANTIZERS[ggml_type](data, ggml_type).reshape(tuple(shape))


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero), exactly; np.round rounds ties to even."""
    magnitude = np.abs(x)
    whole = np.trunc(magnitude)
    return np.copysign(whole + (magnitude - whole >= 0.5), x)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 blocks for float weights whose last dim is a multiple of 32 -> uint8 [..., dim/32*34].

    Per block of 32: d = max|w| / 127, q = roundf(w / d), as llama.cpp's reference does.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % 32:
        raise GGMLError(f"Q8_0 needs rows that are a multiple of 32 weights, got {x.shape[-1]}")
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = _round_half_away(blocks * inverse).astype(np.int8).view(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


def _nibble_pairs(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [..., 32] -> 16 bytes per block: weight j in the low nibble of byte j, weight
    16 + j in its high nibble (Q4_0's and Q4_1's order)."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def encode_q4_0(codes: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Q4_0 blocks holding given 4-bit codes exactly: codes uint8 [rows, n] (0..15), step [rows, n / 32]
    (stored as f16) -> uint8 [rows, n / 32 * 18]; w = step * (code - 8), a grid symmetric about 0."""
    codes = np.asarray(codes, dtype=np.uint8)
    rows, n = codes.shape
    if n % 32 or codes.max(initial=0) > 15 or np.shape(step) != (rows, n // 32):
        raise GGMLError(f"Q4_0 needs codes 0..15 in rows of a multiple of 32 and one step per 32, "
                        f"got codes {codes.shape} and steps {np.shape(step)}")
    out = np.empty((rows, n // 32, 18), dtype=np.uint8)
    out[..., 0:2] = np.asarray(step, dtype="<f2")[..., None].view(np.uint8)
    out[..., 2:] = _nibble_pairs(codes.reshape(rows, n // 32, 32))
    return out.reshape(rows, n // 32 * 18)


def _blocks_of(x: np.ndarray, size: int, kind: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % size:
        raise GGMLError(f"{kind} needs rows that are a multiple of {size} weights, got shape {x.shape}")
    return x.reshape(-1, x.shape[-1] // size, size)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """Q4_0 blocks for float weights [..., n] (n a multiple of 32) -> uint8 [..., n / 32 * 18], as
    llama.cpp's reference does it: the weight of largest magnitude, max, sets d = max / -8, so it
    lands exactly on code 0 (the grid reaches one step further on the other side);
    q = min(15, trunc(w / d + 8.5))."""
    blocks = _blocks_of(x, 32, "Q4_0")
    at = np.abs(blocks).argmax(axis=-1)[..., None]  # the first largest, as C's strict `<` keeps it
    d = np.take_along_axis(blocks, at, axis=-1)[..., 0] / np.float32(-8)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    codes = np.minimum(15, np.trunc(blocks * inverse[..., None] + np.float32(8.5))).astype(np.uint8)
    out = encode_q4_0(codes.reshape(blocks.shape[0], -1), d)
    return out.reshape(*np.shape(x)[:-1], -1)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """Q4_1 blocks for float weights [..., n] (n a multiple of 32) -> uint8 [..., n / 32 * 20], as
    llama.cpp's reference does it: d = (max - min) / 15, m = min, q = min(15, trunc((w - m) / d + 0.5)).
    (lmforge's own int4 grid rounds d and m to f16 *before* choosing codes; the reference does not.)"""
    blocks = _blocks_of(x, 32, "Q4_1")
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    d = (high - low) / np.float32(15)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    codes = np.minimum(15, np.trunc((blocks - low[..., None]) * inverse[..., None] + np.float32(0.5)))
    out = encode_q4_1(codes.astype(np.uint8).reshape(blocks.shape[0], -1), d, low)
    return out.reshape(*np.shape(x)[:-1], -1)


def encode_q4_1(codes: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Q4_1 blocks holding given 4-bit codes exactly: codes uint8 [rows, n] (0..15), step and offset
    [rows, n / 32] (stored as f16) -> uint8 [rows, n / 32 * 20]; w = step * code + offset.

    The inverse of `_dequant_q4_1` for codes that are already chosen (by GPTQ, AWQ, ...): no
    rounding happens here, so llama.cpp reads exactly the weights the quantizer picked."""
    codes = np.asarray(codes, dtype=np.uint8)
    rows, n = codes.shape
    if n % 32 or codes.max(initial=0) > 15 or step.shape != (rows, n // 32) or offset.shape != step.shape:
        raise GGMLError(f"Q4_1 needs codes 0..15 in rows of a multiple of 32 and one step/offset per 32, "
                        f"got codes {codes.shape} and steps {step.shape}")
    blocks = codes.reshape(rows, n // 32, 32)
    out = np.empty((rows, n // 32, 20), dtype=np.uint8)
    out[..., 0:2] = np.asarray(step, dtype="<f2")[..., None].view(np.uint8)
    out[..., 2:4] = np.asarray(offset, dtype="<f2")[..., None].view(np.uint8)
    out[..., 4:] = _nibble_pairs(blocks)
    return out.reshape(rows, n // 32 * 20)


def decode_q4(raw: np.ndarray, ggml_type: GGMLType, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """Q4_0 or Q4_1 blocks -> (codes uint8 [rows, cols] in 0..15, step, offset f32 [rows, cols / 32])
    with w = step * code + offset: Q4_1 as stored, Q4_0's w = d * (q - 8) as offset -8d. The
    inverse of `encode_q4_1`, and no arithmetic on the weights: an int4 layer can hold them as
    they are."""
    width = {GGMLType.Q4_0: 18, GGMLType.Q4_1: 20}.get(ggml_type)
    if width is None or cols % 32:
        raise GGMLError(f"decode_q4 reads Q4_0/Q4_1 rows of a multiple of 32, got {ggml_type} x {cols}")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // 32, width)
    step = _f16(blocks[..., :2].reshape(-1, 2)).reshape(rows, cols // 32)
    if ggml_type == GGMLType.Q4_1:
        offset = _f16(blocks[..., 2:4].reshape(-1, 2)).reshape(rows, cols // 32)
    else:
        offset = np.float32(-8) * step
    nibbles = blocks[..., width - 16:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # weights 0..15, then 16..31
    return codes.reshape(rows, cols), step.astype(np.float32), offset.astype(np.float32)


def encode_q8_0(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Q8_0 blocks holding given int8 codes: codes int8 [rows, n], scale [rows] per row (as
    lmforge's int8 layers keep it) or [rows, n / 32] -> uint8 [rows, n / 32 * 34]; w = scale * code.
    The scale is stored in f16 (Q8_0's format): the only rounding."""
    codes = np.asarray(codes, dtype=np.int8)
    rows, n = codes.shape
    scale = np.asarray(scale, dtype=np.float32)
    scale = np.repeat(scale[:, None], n // 32, axis=1) if scale.ndim == 1 else scale
    if n % 32 or scale.shape != (rows, n // 32):
        raise GGMLError(f"Q8_0 needs rows of a multiple of 32 and a scale per row or per 32, got codes "
                        f"{codes.shape} and scales {scale.shape}")
    out = np.empty((rows, n // 32, 34), dtype=np.uint8)
    out[..., 0:2] = scale.astype("<f2")[..., None].view(np.uint8)
    out[..., 2:] = codes.reshape(rows, n // 32, 32).view(np.uint8)
    return out.reshape(rows, n // 32 * 34)


def decode_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks -> (codes int8 [rows, cols], scale f32 [rows, cols / 32]) with w = scale * code:
    the inverse of `encode_q8_0`, no arithmetic on the weights."""
    if cols % 32:
        raise GGMLError(f"decode_q8_0 reads rows of a multiple of 32, got {cols}")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // 32, 34)
    scale = _f16(blocks[..., :2].reshape(-1, 2)).reshape(rows, cols // 32)
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols), scale


# --------------------------------------------------------------------------- Q4_K
# A Q4_K super-block holds 256 weights as 8 sub-blocks of 32: w = d * sc_j * q - dmin * m_j, with
# 4-bit codes q, 6-bit sub-block scales sc_j and mins m_j, and two f16 super-scales d and dmin
# (ggml's block_q4_K: d, dmin, 12 bytes of packed sc/m, 128 bytes of codes). Quantizing is two
# nested fits: each sub-block's own (scale, min) first, then those 8 scales and 8 mins rounded to
# 6 bits against the super-block's largest, and the codes chosen again for the rounded grid.


def encode_q4_k(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, d: np.ndarray,
                dmin: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks from their parts: codes uint8 [S, 256] (0..15), 6-bit scales and mins
    uint8 [S, 8], super-scales d and dmin [S] (stored as f16) -> uint8 [S, 144].

    Scales and mins of sub-blocks 0..3 take the low 6 bits of bytes 0..3 and 4..7; those of
    4..7 are split: low nibbles in bytes 8..11, top 2 bits in the spare top bits of bytes 0..7.
    Codes go 64 at a time into 32 bytes: the first 32 in the low nibbles, the next 32 in the high."""
    codes, scales, mins = (np.asarray(a, dtype=np.uint8) for a in (codes, scales, mins))
    n = codes.shape[0]
    if (codes.shape != (n, 256) or scales.shape != (n, 8) or mins.shape != (n, 8) or codes.max(initial=0) > 15
            or max(scales.max(initial=0), mins.max(initial=0)) > 63):
        raise GGMLError(f"Q4_K needs codes 0..15 [S, 256] and 6-bit scales and mins [S, 8], got "
                        f"{codes.shape}, {scales.shape}, {mins.shape}")
    out = np.empty((n, 144), dtype=np.uint8)
    out[:, 0:2] = np.asarray(d, dtype="<f2").reshape(n, 1).view(np.uint8)
    out[:, 2:4] = np.asarray(dmin, dtype="<f2").reshape(n, 1).view(np.uint8)
    out[:, 4:8] = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    out[:, 8:12] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    out[:, 12:16] = (scales[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)
    pairs = codes.reshape(n, 4, 2, 32)
    out[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return out


def _in_order(terms: np.ndarray) -> np.ndarray:
    """Sum over the first axis one term after another in float32, as a C loop does (numpy's
    pairwise sum rounds differently, and the search below compares such sums). Summing rows of
    a [n, B] array keeps every step a contiguous vector add."""
    total = terms[0].copy()
    for term in terms[1:]:
        total += term
    return total


def _nearest(x: np.ndarray, top: int) -> np.ndarray:
    """ggml's nearest_int (ties to even) clamped to 0..top, as float32."""
    return np.clip(np.rint(x), 0, top).astype(np.float32)


def fit_scale_min(x: np.ndarray, weights: np.ndarray, levels: int = 15, rmin: float = -1.0,
                  rdelta: float = 0.1, nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (scale, min, codes) per row of x [B, n] for w ~ scale * q - min, q in 0..levels, min >= 0
    (ggml's make_qkx2_quants, vectorized over rows).

    Start from the full range [min(x, 0), max(x)]. Then try nstep + 1 slightly wider or
    narrower grids, iscale = (levels + rmin + rdelta * i) / (max - offset): each assigns codes
    q, and for fixed codes the weighted least-squares fit x ~ scale * q + offset has a closed
    form (the 2x2 normal equations: D = Σw Σwq² - (Σwq)², scale = (Σw Σwqx - Σwx Σwq) / D); an
    offset above 0 is clamped to 0 (then scale = Σwqx / Σwq²). A fit with less weighted squared
    error replaces the best so far, and its offset anchors the following grids. Sums run in
    order in float32, as in C, so that the choices are llama.cpp's."""
    f32 = np.float32
    x = np.ascontiguousarray(np.asarray(x, dtype=f32).T)  # [n, B]: one sub-block per column
    weights = np.ascontiguousarray(np.asarray(weights, dtype=f32).T)
    high = x.max(axis=0)
    offset = np.minimum(x.min(axis=0), f32(0))
    flat = high == offset
    sum_w, sum_x = _in_order(weights), _in_order(weights * x)

    def grid(iscale_times_span: np.float32) -> np.ndarray:
        return _nearest(iscale_times_span / np.where(flat, f32(1), high - offset) * (x - offset), levels)

    def squared_error(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray) -> np.ndarray:
        diff = (scale * codes + offset) - x
        return _in_order(weights * (diff * diff))

    scale = f32(1) / (f32(levels) / np.where(flat, f32(1), high - offset))  # 1 / iscale, as C rounds it
    codes = grid(f32(levels))
    best = squared_error(scale, offset, codes)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(nstep + 1):
            trial = grid(f32(rmin) + f32(rdelta) * f32(i) + f32(levels))
            wq = weights * trial
            sum_q, sum_q2, sum_qx = _in_order(wq), _in_order(wq * trial), _in_order(wq * x)
            det = sum_w * sum_q2 - sum_q * sum_q
            this_scale = (sum_w * sum_qx - sum_x * sum_q) / det
            this_offset = (sum_q2 * sum_x - sum_q * sum_qx) / det
            above = this_offset > 0
            this_offset = np.where(above, f32(0), this_offset)
            this_scale = np.where(above, sum_qx / sum_q2, this_scale)
            error = squared_error(this_scale, this_offset, trial)
            better = (det > 0) & (error < best) & ~flat
            codes[:, better], best[better] = trial[:, better], error[better]
            scale[better], offset[better] = this_scale[better], this_offset[better]
    scale[flat] = 0
    codes[:, flat] = 0
    return scale, -offset, np.ascontiguousarray(codes.T)


def _six_bits(values: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """values [S, 8] >= 0 as 6-bit codes against the row's largest (which becomes 63)."""
    with np.errstate(divide="ignore"):
        inverse = np.where(largest > 0, np.float32(63) / largest, np.float32(0))
    wrapped = np.rint(inverse[:, None] * values).astype(np.int64) & 0xFF  # C stores the int in a uint8
    return np.minimum(63, wrapped).astype(np.uint8)


def quantize_q4_k(x: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """Q4_K super-blocks for float weights [..., n] (n a multiple of 256) -> uint8 [..., n / 256 * 144],
    by llama.cpp's reference recipe (quantize_row_q4_K_ref, no importance matrix):

    1. each sub-block of 32 gets (scale, min) from `fit_scale_min`, weighting every weight by
       rms(sub-block) + |w| (large weights matter more);
    2. the 8 scales become 6-bit codes against the largest (d = largest / 63, f16), the 8 mins
       likewise (dmin);
    3. every weight takes the nearest code on its sub-block's rounded grid d*sc, dmin*m
       (a sub-block whose scale rounded to 0 keeps the codes from step 1)."""
    f32 = np.float32
    blocks = _blocks_of(x, 256, "Q4_K").reshape(-1, 8, 32)
    out = np.empty((blocks.shape[0], 144), dtype=np.uint8)
    for start in range(0, blocks.shape[0], chunk):  # bounded memory for large matrices
        sub = blocks[start:start + chunk]
        s = sub.shape[0]
        flat = sub.reshape(-1, 32)
        rms = np.sqrt(_in_order(np.ascontiguousarray((flat * flat).T)) / f32(32))
        scale, low, codes = fit_scale_min(flat, rms[:, None] + np.abs(flat))
        scale, low = scale.reshape(s, 8), low.reshape(s, 8)
        top_scale, top_min = np.maximum(scale.max(axis=1), f32(0)), np.maximum(low.max(axis=1), f32(0))
        scale_codes, min_codes = _six_bits(scale, top_scale), _six_bits(low, top_min)
        d, dmin = (top_scale / f32(63)).astype(np.float16), (top_min / f32(63)).astype(np.float16)
        step = d.astype(f32)[:, None] * scale_codes  # the grid as stored
        offset = dmin.astype(f32)[:, None] * min_codes
        with np.errstate(divide="ignore", invalid="ignore"):
            again = _nearest((sub + offset[..., None]) / step[..., None], 15)
        codes = np.where((step != 0)[..., None], again, codes.reshape(s, 8, 32))
        out[start:start + s] = encode_q4_k(codes.reshape(s, 256), scale_codes, min_codes, d, dmin)
    return out.reshape(*np.shape(x)[:-1], -1)


# Float weights -> blocks, for the types lmforge writes (each matches llama.cpp's reference byte for byte).
QUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q8_0: quantize_q8_0, GGMLType.Q4_0: quantize_q4_0, GGMLType.Q4_1: quantize_q4_1,
    GGMLType.Q4_K: quantize_q4_k,
}


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as ggml and PyTorch do; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a quiet NaN, sign kept
    return rounded
