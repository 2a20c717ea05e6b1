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
    out[..., 4:] = blocks[..., :16] | (blocks[..., 16:] << 4)
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


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as ggml and PyTorch do; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a quiet NaN, sign kept
    return rounded
