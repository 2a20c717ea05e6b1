"""GGUF: read llama.cpp's single-file model format, and export lmforge models to it.

A GGUF file is a header ("GGUF", version, counts), typed metadata key/values, one
record per tensor (name, dims, ggml type, offset), then the tensor bytes, each tensor
aligned to `general.alignment`. Quantized types pack 32 or 256 weights into a block
with shared scales; dequantizing is one vectorized numpy expression per type.

The module has three layers, each usable on its own:

- the container: `GGUFFile` (reads v2/v3 through `np.memmap`) and `write_gguf`;
- the block formats: `dequantize` and `quantize_q8_0`;
- the model mapping: `load_gguf_model` and `export_gguf`, which translate between
  llama.cpp's tensor names and hyperparameter keys and lmforge's `Transformer`.

One subtlety of the mapping: llama.cpp applies RoPE to adjacent channel pairs
(2i, 2i+1), while lmforge, like Hugging Face checkpoints, pairs channel i with i+hd/2.
llama.cpp's converter therefore reorders the rows of each head of W_q and W_k; we undo
that on load and redo it on export. Both layouts give the same attention scores, since
q and k are permuted alike.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.atomic import atomic_write
from lmforge.model.config import ConfigError, ModelConfig

GGUF_MAGIC = b"GGUF"
READABLE_VERSIONS = (2, 3)
WRITTEN_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most four dimensions


class GGUFError(ValueError):
    """A GGUF file lmforge cannot read, or a model it cannot express as GGUF."""


# --------------------------------------------------------------------------- type tables


class ValueType(enum.IntEnum):
    """Type tags of metadata values."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Little-endian numpy dtype of each fixed-size value type.
_VALUE_DTYPES: dict[ValueType, np.dtype] = {
    t: np.dtype(code) for t, code in [
        (ValueType.UINT8, "<u1"), (ValueType.INT8, "<i1"), (ValueType.UINT16, "<u2"),
        (ValueType.INT16, "<i2"), (ValueType.UINT32, "<u4"), (ValueType.INT32, "<i4"),
        (ValueType.FLOAT32, "<f4"), (ValueType.BOOL, "?"), (ValueType.UINT64, "<u8"),
        (ValueType.INT64, "<i8"), (ValueType.FLOAT64, "<f8"),
    ]
}


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
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // block * block_bytes


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: GGUF lists dims innermost-first, we reverse them
    ggml_type: GGMLType
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Sequential little-endian reads from a buffer; running off its end is a GGUFError."""

    def __init__(self, buffer: memoryview, source: str) -> None:
        self.buffer, self.source, self.pos = buffer, source, 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buffer):
            raise GGUFError(f"{self.source}: truncated file: {what} needs bytes {self.pos}..{end}, "
                            f"but the file has {len(self.buffer)} bytes")
        view = self.buffer[self.pos:end]
        self.pos = end
        return view

    def scalar(self, vtype: ValueType, what: str) -> Any:
        dtype = _VALUE_DTYPES[vtype]
        return np.frombuffer(self.take(dtype.itemsize, what), dtype)[0].item()

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64(what), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as err:
            raise GGUFError(f"{self.source}: {what} is not valid UTF-8 ({err})") from err

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row: the hot path for vocabularies of 100k+ tokens and merges."""
        buffer, pos, size, out = self.buffer, self.pos, len(self.buffer), []
        try:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buffer, pos)
                if pos + 8 + n > size:
                    break
                out.append(str(buffer[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except struct.error:
            pass
        except UnicodeDecodeError as err:
            raise GGUFError(f"{self.source}: {what}[{len(out)}] is not valid UTF-8 ({err})") from err
        self.pos = pos
        if len(out) < count:
            raise GGUFError(f"{self.source}: truncated file: {what} ends after {len(out)} of {count} "
                            f"strings (byte {pos} of {size})")
        return out

    def value(self, vtype: int, what: str) -> tuple[Any, tuple[ValueType, ...]]:
        """One metadata value and its type path, e.g. (ARRAY, STRING) for a list of strings."""
        if vtype not in ValueType._value2member_map_:
            raise GGUFError(f"{self.source}: {what} has unknown value type {vtype}")
        vtype = ValueType(vtype)
        if vtype == ValueType.STRING:
            return self.string(what), (vtype,)
        if vtype != ValueType.ARRAY:
            value = self.scalar(vtype, what)
            if vtype == ValueType.FLOAT32:  # shortest decimal that is the same float32: 1e-05, not 9.99..e-06
                value = float(str(np.float32(value)))
            return value, (vtype,)
        item_type, count = self.u32(what), self.u64(what)
        if item_type == ValueType.STRING:
            return self.strings(count, what), (ValueType.ARRAY, ValueType.STRING)
        if item_type == ValueType.ARRAY:
            items, inner = [], (ValueType.ARRAY,)
            for i in range(count):
                item, inner = self.value(item_type, f"{what}[{i}]")
                items.append(item)
            return items, (ValueType.ARRAY, *inner)
        if item_type not in ValueType._value2member_map_:
            raise GGUFError(f"{self.source}: {what} is an array of unknown value type {item_type}")
        dtype = _VALUE_DTYPES[ValueType(item_type)]
        raw = self.take(count * dtype.itemsize, what)
        return np.frombuffer(raw, dtype).tolist(), (ValueType.ARRAY, ValueType(item_type))


class GGUFFile:
    """A GGUF file opened for reading: metadata and tensor infos parsed, data memory-mapped.

    `metadata` holds plain Python values (str, int, float, bool, nested lists);
    `metadata_types` the GGUF type of each, outermost first. `tensor(name)` dequantizes
    one tensor to float32 on demand, so opening a large file costs only its header.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (it starts with {head[:4]!r}, "
                            f"a GGUF starts with {GGUF_MAGIC!r})")
        if size < 8:
            raise GGUFError(f"{self.path}: truncated file: {size} bytes, too short for a GGUF header")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[ValueType, ...]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(_Cursor(memoryview(self._data), str(self.path)))

    def _parse(self, cur: _Cursor) -> None:
        cur.take(4, "magic")
        self.version = cur.u32("version")
        if self.version not in READABLE_VERSIONS:
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            if swapped in READABLE_VERSIONS:
                raise GGUFError(f"{self.path}: big-endian GGUF (version {swapped}) is not supported")
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version} "
                            f"(lmforge reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
        if n_tensors > len(cur.buffer) or n_kv > len(cur.buffer):
            raise GGUFError(f"{self.path}: corrupt or truncated header "
                            f"({n_tensors} tensors, {n_kv} metadata keys in {len(cur.buffer)} bytes)")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            value, types = cur.value(cur.u32(f"type of {key}"), f"metadata {key!r}")
            self.metadata[key], self.metadata_types[key] = value, types

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment must be a power of two, got {alignment!r}")
        self.alignment = alignment

        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"rank of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dims (ggml allows 1..{MAX_DIMS})")
            dims = [cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims)]
            type_id, offset = cur.u32(f"type of tensor {name!r}"), cur.u64(f"offset of tensor {name!r}")
            raw_infos.append((name, dims, type_id, offset))
        self.data_offset = _align(cur.pos, alignment)

        for name, dims, type_id, offset in raw_infos:
            self.tensors[name] = self._tensor_info(name, dims, type_id, offset)

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
        if type_id not in GGMLType._value2member_map_:
            raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type id {type_id}")
        ggml_type = GGMLType(type_id)
        block = BLOCK_LAYOUT[ggml_type][0]
        if dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} ({ggml_type.name}) has a row of {dims[0]} "
                            f"weights, not a multiple of its block size {block}")
        if offset % self.alignment:
            raise GGUFError(f"{self.path}: tensor {name!r} data offset {offset} is not "
                            f"{self.alignment}-byte aligned")
        shape = tuple(reversed(dims))
        start, nbytes = self.data_offset + offset, tensor_nbytes(ggml_type, shape)
        if start + nbytes > len(self._data):
            raise GGUFError(f"{self.path}: tensor {name!r} data (bytes {start}..{start + nbytes}) runs past "
                            f"the end of the file ({len(self._data)} bytes): truncated or corrupt file")
        return TensorInfo(name, shape, ggml_type, start, nbytes)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a read-only view of the file, no copy)."""
        info = self._info(name)
        return np.asarray(self._data[info.offset:info.offset + info.nbytes])

    def tensor(self, name: str) -> np.ndarray:
        """float32 array in PyTorch shape; for F32 tensors a read-only view of the file."""
        info = self._info(name)
        if info.ggml_type not in DEQUANTIZERS:
            supported = ", ".join(t.name for t in DEQUANTIZERS)
            raise GGUFError(f"{self.path}: tensor {name!r} has ggml type {info.ggml_type.name}, "
                            f"which lmforge cannot dequantize (supported: {supported})")
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset) % alignment


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
        raise GGUFError(f"cannot dequantize ggml type {ggml_type.name} "
                        f"(supported: {', '.join(t.name for t in DEQUANTIZERS)})")
    data = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes | bytearray) else raw
    data = np.ascontiguousarray(data).view(np.uint8).ravel()
    expected = tensor_nbytes(ggml_type, shape)
    if data.size != expected:
        raise GGUFError(f"{ggml_type.name} tensor of shape {tuple(shape)} needs {expected} bytes, "
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
        raise GGUFError(f"Q8_0 needs rows that are a multiple of 32 weights, got {x.shape[-1]}")
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = _round_half_away(blocks * inverse).astype(np.int8).view(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorData:
    """One tensor for `write_gguf`: `data` holds the already-encoded bytes (any dtype)."""

    name: str
    shape: tuple[int, ...]  # PyTorch order
    ggml_type: GGMLType
    data: np.ndarray


def infer_value_types(value: Any, key: str = "value") -> tuple[ValueType, ...]:
    """The GGUF type llama.cpp expects for a plain Python value.

    ints become UINT32 (INT32/INT64 when negative or large), floats FLOAT32, lists of
    ints INT32 (llama.cpp reads token types as int32) and lists of floats FLOAT32.
    Pass explicit `types` to `write_gguf` for anything else.
    """
    if isinstance(value, bool | np.bool_):
        return (ValueType.BOOL,)
    if isinstance(value, int | np.integer):
        value = int(value)
        if 0 <= value < 2**32:
            return (ValueType.UINT32,)
        return (ValueType.INT32,) if -(2**31) <= value < 2**31 else (ValueType.INT64,)
    if isinstance(value, float | np.floating):
        return (ValueType.FLOAT32,)
    if isinstance(value, str):
        return (ValueType.STRING,)
    if isinstance(value, list | tuple | np.ndarray):
        items = np.asarray(value) if not isinstance(value, np.ndarray) else value
        if len(value) == 0:
            return (ValueType.ARRAY, ValueType.STRING)
        if items.dtype == object or items.ndim > 1:  # ragged or nested lists
            return (ValueType.ARRAY, *infer_value_types(value[0], key))
        if items.dtype.kind in "US":
            return (ValueType.ARRAY, ValueType.STRING)
        if items.dtype.kind == "b":
            return (ValueType.ARRAY, ValueType.BOOL)
        if items.dtype.kind in "iu":
            small = items.min() >= -(2**31) and items.max() < 2**31
            return (ValueType.ARRAY, ValueType.INT32 if small else ValueType.INT64)
        if items.dtype.kind == "f":
            return (ValueType.ARRAY, ValueType.FLOAT32)
    raise GGUFError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, types: tuple[ValueType, ...], key: str) -> bytes:
    """The bytes of one value (without its leading type tag)."""
    vtype = types[0]
    if vtype == ValueType.STRING:
        return _encode_string(value)
    if vtype != ValueType.ARRAY:
        return np.asarray(value, dtype=_VALUE_DTYPES[vtype]).tobytes()
    if len(types) < 2:
        raise GGUFError(f"metadata {key!r}: an ARRAY type needs an element type")
    item_type = types[1]
    header = struct.pack("<IQ", item_type, len(value))
    if item_type == ValueType.STRING:
        return header + b"".join(_encode_string(item) for item in value)
    if item_type == ValueType.ARRAY:
        return header + b"".join(_encode_value(item, types[1:], key) for item in value)
    return header + np.asarray(value, dtype=_VALUE_DTYPES[item_type]).tobytes()


def write_gguf(
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    tensors: Iterable[TensorData],
    *,
    types: Mapping[str, tuple[ValueType, ...]] | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
) -> Path:
    """Write a GGUF v3 file atomically (temp file in the same folder, then rename).

    Metadata types come from `types` where given, else from `infer_value_types`.
    """
    path, types = Path(path), dict(types or {})
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"], types["general.alignment"] = alignment, (ValueType.UINT32,)
    tensors = list(tensors)

    header = [GGUF_MAGIC, struct.pack("<IQQ", WRITTEN_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        vtypes = types.get(key) or infer_value_types(value, key)
        header += [_encode_string(key), struct.pack("<I", vtypes[0]), _encode_value(value, vtypes, key)]

    offset, payloads = 0, []
    for t in tensors:
        if not 1 <= len(t.shape) <= MAX_DIMS:
            raise GGUFError(f"tensor {t.name!r}: GGUF stores 1 to {MAX_DIMS} dims, got shape {t.shape}")
        if t.shape[-1] % BLOCK_LAYOUT[t.ggml_type][0]:
            raise GGUFError(f"tensor {t.name!r}: rows of {t.shape[-1]} do not fill {t.ggml_type.name} blocks")
        payload = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        if payload.size != tensor_nbytes(t.ggml_type, t.shape):
            raise GGUFError(f"tensor {t.name!r}: {t.ggml_type.name} of shape {t.shape} needs "
                            f"{tensor_nbytes(t.ggml_type, t.shape)} bytes, got {payload.size}")
        dims = list(reversed(t.shape))
        info = struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, offset)
        header += [_encode_string(t.name), info]
        payloads.append((offset, payload))
        offset = _align(offset + payload.size, alignment)

    with atomic_write(path) as f:
        head = b"".join(header)
        f.write(head + bytes(_align(len(head), alignment) - len(head)))
        data_start = f.tell()
        for start, payload in payloads:
            f.write(bytes(data_start + start - f.tell()))
            f.write(payload.data)
    return path


# --------------------------------------------------------------------------- model mapping


@dataclass(frozen=True)
class _Architecture:
    name: str
    permute_qk: bool  # llama.cpp's converter reorders W_q/W_k rows for the adjacent-pair RoPE
    qkv_bias: bool | None  # None: whatever the tensors say


ARCHITECTURES = {
    "llama": _Architecture("llama", permute_qk=True, qkv_bias=None),
    "qwen2": _Architecture("qwen2", permute_qk=False, qkv_bias=True),  # llama.cpp runs Qwen2 with NeoX RoPE
}

# `{arch}.` keys the mapping reads; any other key in the architecture's namespace is an error.
_HYPERPARAMETER_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear",
    "expert_count", "expert_used_count",
}
# Keys that describe provenance, not the computation.
_INFORMATIONAL_KEYS = {"tensor_data_layout", "rope.scaling.finetuned", "rope.scaling.original_context_length"}


def config_from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> ModelConfig:
    """The `ModelConfig` a GGUF file describes; whatever lmforge cannot express is a GGUFError."""
    arch_name = metadata.get("general.architecture")
    if arch_name is None:
        raise GGUFError("GGUF metadata has no general.architecture")
    if arch_name not in ARCHITECTURES:
        raise GGUFError(f"general.architecture {arch_name!r} is not supported "
                        f"(lmforge maps: {', '.join(ARCHITECTURES)})")
    if metadata.get("split.count", 1) > 1:
        raise GGUFError(f"this GGUF is part of a {metadata['split.count']}-file split; merge it first")
    arch = ARCHITECTURES[arch_name]
    prefix = f"{arch_name}."
    unknown = sorted(k for k in metadata if k.startswith(prefix)
                     and k[len(prefix):] not in _HYPERPARAMETER_KEYS | _INFORMATIONAL_KEYS)
    if unknown:
        raise GGUFError(f"lmforge cannot express these {arch_name} hyperparameters: {', '.join(unknown)}")

    def get(key: str, kind: type, default: Any = None) -> Any:
        value = metadata.get(prefix + key, default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks required key {prefix + key}")
        if isinstance(value, list):
            raise GGUFError(f"{prefix + key} holds per-layer values, which lmforge cannot express")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GGUFError(f"{prefix + key} should be {kind.__name__}, got {value!r}")
        return value

    d_model, n_heads = get("embedding_length", int), get("attention.head_count", int)
    head_dim = get("attention.key_length", int, d_model // n_heads)
    if get("attention.value_length", int, head_dim) != head_dim:
        raise GGUFError("attention.key_length and attention.value_length differ; lmforge needs them equal")
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise GGUFError(f"{prefix}rope.dimension_count is {metadata[prefix + 'rope.dimension_count']}, "
                        f"not the head dim {head_dim}: partial rotary embeddings are not supported")
    if "rope_freqs.weight" in tensors:
        raise GGUFError("rope_freqs.weight (per-channel RoPE frequency factors, e.g. Llama 3.1 scaling) "
                        "is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    vocab_size = tensors["token_embd.weight"].shape[0]
    if get("vocab_size", int, vocab_size) != vocab_size:
        raise GGUFError(f"{prefix}vocab_size {metadata[prefix + 'vocab_size']} disagrees with "
                        f"token_embd.weight rows ({vocab_size})")
    n_experts = get("expert_count", int, 0)

    values: dict[str, Any] = dict(
        vocab_size=vocab_size, d_model=d_model, n_layers=get("block_count", int), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", int, n_heads),
        head_dim=head_dim if head_dim != d_model // n_heads else None,
        d_ff=get("feed_forward_length", int), max_seq_len=get("context_length", int),
        position="rope", rope_theta=float(get("rope.freq_base", float, 10000.0)),
        rope_scaling=_rope_scaling(metadata, prefix),
        norm="rmsnorm", norm_eps=get("attention.layer_norm_rms_epsilon", float), mlp="swiglu",
        qkv_bias=arch.qkv_bias if arch.qkv_bias is not None else "blk.0.attn_q.bias" in tensors,
        out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors or "blk.0.ffn_up_exps.bias" in tensors,
        norm_bias=False, sliding_window=get("attention.sliding_window", int, 0) or None,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        n_experts=n_experts, n_experts_per_token=get("expert_used_count", int, 2) if n_experts else 2,
        tie_embeddings="output.weight" not in tensors,
        extra={"gguf": {"architecture": arch_name, "name": metadata.get("general.name"),
                        "file_type": metadata.get("general.file_type")}},
    )
    try:
        return ModelConfig(**values)
    except ConfigError as err:
        raise GGUFError(f"GGUF hyperparameters do not make a valid lmforge model: {err}") from err


def _rope_scaling(metadata: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    kind = metadata.get(prefix + "rope.scaling.type", "none")
    factor = metadata.get(prefix + "rope.scaling.factor")
    if prefix + "rope.scale_linear" in metadata and kind == "none":  # the key older files use
        kind, factor = "linear", metadata[prefix + "rope.scale_linear"]
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFError(f"{prefix}rope.scaling.type {kind!r} is not supported (lmforge maps: none, linear)")
    if not isinstance(factor, float | int) or factor <= 0:
        raise GGUFError(f"linear RoPE scaling needs a positive {prefix}rope.scaling.factor, got {factor!r}")
    return None if factor == 1 else {"type": "linear", "factor": float(factor)}


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """lmforge state-dict name -> GGUF tensor name, for every tensor except MoE experts."""
    names = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        pairs = [("attn_norm.weight", "attn_norm.weight"), ("mlp_norm.weight", "ffn_norm.weight")]
        projections = [("attn.q_proj", "attn_q", config.qkv_bias), ("attn.k_proj", "attn_k", config.qkv_bias),
                       ("attn.v_proj", "attn_v", config.qkv_bias),
                       ("attn.o_proj", "attn_output", config.out_bias)]
        if not config.n_experts:
            projections += [("mlp.gate_proj", "ffn_gate", config.mlp_bias),
                            ("mlp.up_proj", "ffn_up", config.mlp_bias),
                            ("mlp.down_proj", "ffn_down", config.mlp_bias)]
        else:
            pairs.append(("mlp.router.weight", "ffn_gate_inp.weight"))
        for a, b, has_bias in projections:
            pairs += [(f"{a}.weight", f"{b}.weight")] + ([(f"{a}.bias", f"{b}.bias")] if has_bias else [])
        if config.qk_norm:
            pairs += [("attn.q_norm.weight", "attn_q_norm.weight"),
                      ("attn.k_norm.weight", "attn_k_norm.weight")]
        names.update({ours + a: theirs + b for a, b in pairs})
    return names


# MoE experts: llama.cpp stacks the E experts of a block into one 3-D tensor per projection.
_EXPERT_PROJECTIONS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in a `Transformer(config)` state dict that GGUF can hold."""
    d, hd, v = config.d_model, config.dim_per_head, config.vocab_size
    q_out, kv_out = config.n_heads * hd, config.kv_heads * hd
    per_layer = {
        "attn_norm.weight": (d,), "mlp_norm.weight": (d,),
        "attn.q_proj.weight": (q_out, d), "attn.k_proj.weight": (kv_out, d),
        "attn.v_proj.weight": (kv_out, d),
        "attn.o_proj.weight": (d, q_out), "attn.q_proj.bias": (q_out,), "attn.k_proj.bias": (kv_out,),
        "attn.v_proj.bias": (kv_out,), "attn.o_proj.bias": (d,), "attn.q_norm.weight": (hd,),
        "attn.k_norm.weight": (hd,), "mlp.router.weight": (config.n_experts, d),
    }
    mlp = {"gate_proj.weight": (config.d_ff, d), "up_proj.weight": (config.d_ff, d),
           "down_proj.weight": (d, config.d_ff), "gate_proj.bias": (config.d_ff,),
           "up_proj.bias": (config.d_ff,), "down_proj.bias": (d,)}
    shapes = {"embed.weight": (v, d), "final_norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config.n_layers):
        shapes |= {f"blocks.{i}.{k}": s for k, s in per_layer.items()}
        shapes |= {f"blocks.{i}.mlp.{k}": s for k, s in mlp.items()}
        for e in range(config.n_experts):
            shapes |= {f"blocks.{i}.mlp.experts.{e}.{k}": s for k, s in mlp.items()}
    return shapes


def _permute_rows(w: np.ndarray, n_heads: int, *, to_gguf: bool) -> np.ndarray:
    """Reorder each head's rows between the rotate-half layout (lmforge) and llama.cpp's pairs.

    rotate-half: rows [x_0 .. x_{h/2-1}, y_0 .. y_{h/2-1}];  llama.cpp: [x_0, y_0, x_1, y_1, ...].
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    if to_gguf:
        return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads to (un)permute a tensor by, or None when it is not W_q/W_k."""
    if ".attn.q_proj." in name:
        return config.n_heads
    if ".attn.k_proj." in name:
        return config.kv_heads
    return None


def load_gguf_model(
    path: str | os.PathLike[str],
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a llama/qwen2 GGUF into (config, float32 state dict for `Transformer`, metadata).

    Every tensor is dequantized to float32. A tensor lmforge has no place for, or a
    hyperparameter it cannot express, is an error rather than silently dropped.
    """
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf.metadata, gguf.tensors)
    arch = ARCHITECTURES[config.extra["gguf"]["architecture"]]
    shapes = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def fetch(theirs: str, shape: tuple[int, ...]) -> np.ndarray:
        if theirs not in gguf.tensors:
            raise GGUFError(f"{path}: missing tensor {theirs!r}")
        if gguf.tensors[theirs].shape != shape:
            raise GGUFError(f"{path}: tensor {theirs!r} has shape {gguf.tensors[theirs].shape}, "
                            f"the metadata implies {shape}")
        used.add(theirs)
        return gguf.tensor(theirs)

    for ours, theirs in tensor_names(config).items():
        w = fetch(theirs, shapes[ours])
        heads = _permuted_heads(ours, config)
        if arch.permute_qk and heads:
            w = _permute_rows(w, heads, to_gguf=False)
        state[ours] = _to_torch(w)
    for i in range(config.n_layers):
        for proj, stacked in _EXPERT_PROJECTIONS.items() if config.n_experts else ():
            for part in ("weight", "bias") if config.mlp_bias else ("weight",):
                one = shapes[f"blocks.{i}.mlp.{proj}.{part}"]
                w = fetch(f"blk.{i}.{stacked}.{part}", (config.n_experts, *one))
                for e in range(config.n_experts):
                    state[f"blocks.{i}.mlp.experts.{e}.{proj}.{part}"] = _to_torch(w[e])
    leftover = sorted(set(gguf.tensors) - used)
    if leftover:
        shown = ", ".join(leftover[:8]) + (f" and {len(leftover) - 8} more" if len(leftover) > 8 else "")
        raise GGUFError(f"{path}: lmforge has no place for these tensors: {shown}")
    return config, state, dict(gguf.metadata)


def _to_torch(w: np.ndarray) -> torch.Tensor:
    """A writable, contiguous copy only where needed (views of the file are read-only)."""
    return torch.from_numpy(np.require(w, dtype=np.float32, requirements=["C", "W"]))


# --------------------------------------------------------------------------- export

ExportDType = Literal["f32", "f16", "q8_0"]
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's `llama_ftype`: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def _check_exportable(config: ModelConfig) -> None:
    problems = []
    if config.position != "rope":
        problems.append(f"position={config.position!r} (llama needs rope)")
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (llama needs rmsnorm)")
    if config.mlp != "swiglu":
        problems.append(f"mlp={config.mlp!r} (llama needs swiglu)")
    if config.qk_norm:
        problems.append("qk_norm (llama has none)")
    if config.n_experts and config.mlp_bias:
        problems.append("mlp_bias with experts (llama's experts have no biases)")
    if config.rope_scaling and config.rope_scaling.get("type") != "linear":
        problems.append(f"rope_scaling type {config.rope_scaling.get('type')!r} (only linear is exported)")
    if problems:
        raise GGUFError("cannot export as a llama GGUF: " + "; ".join(problems))


def gguf_hyperparameters(config: ModelConfig) -> dict[str, Any]:
    """The `llama.*` keys llama.cpp reads for this config."""
    hp: dict[str, Any] = {
        "llama.vocab_size": config.vocab_size,
        "llama.context_length": config.max_seq_len,
        "llama.embedding_length": config.d_model,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.d_ff,
        "llama.rope.dimension_count": config.dim_per_head,
        "llama.rope.freq_base": float(config.rope_theta),
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(config.norm_eps),
    }
    if config.dim_per_head != config.d_model // config.n_heads:
        hp["llama.attention.key_length"] = hp["llama.attention.value_length"] = config.dim_per_head
    if config.rope_scaling:
        hp["llama.rope.scaling.type"] = "linear"
        hp["llama.rope.scaling.factor"] = float(config.rope_scaling["factor"])
    if config.sliding_window:  # read back by lmforge; llama.cpp's llama graph ignores it
        hp["llama.attention.sliding_window"] = config.sliding_window
    if config.n_experts:
        hp["llama.expert_count"] = config.n_experts
        hp["llama.expert_used_count"] = config.n_experts_per_token
    return hp


def _encode_weight(name: str, w: np.ndarray, dtype: ExportDType) -> TensorData:
    """1-D tensors and MoE routers stay F32 (llama.cpp expects it); matrices take `dtype`."""
    keep_f32 = w.ndim == 1 or name.endswith("ffn_gate_inp.weight") or dtype == "f32"
    if keep_f32:
        return TensorData(name, w.shape, GGMLType.F32, w.astype(np.float32))
    if dtype == "q8_0" and w.shape[-1] % 32 == 0:
        return TensorData(name, w.shape, GGMLType.Q8_0, quantize_q8_0(w))
    return TensorData(name, w.shape, GGMLType.F16, w.astype(np.float16))  # also Q8_0's fallback


def export_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_metadata: Mapping[str, Any],
    dtype: ExportDType = "f16",
    *,
    name: str | None = None,
) -> Path:
    """Write a llama-architecture GGUF v3 that llama.cpp loads, atomically.

    `tokenizer_metadata` supplies the `tokenizer.*` keys (`Tokenizer.gguf_metadata()`).
    Matrices are stored as `dtype`; norms and other 1-D tensors stay F32.
    """
    if dtype not in _FILE_TYPES:
        raise GGUFError(f"dtype must be one of {', '.join(_FILE_TYPES)}, got {dtype!r}")
    _check_exportable(config)
    foreign = sorted(k for k in tokenizer_metadata if not k.startswith("tokenizer."))
    if foreign:
        raise GGUFError(f"tokenizer_metadata may only hold tokenizer.* keys, got: {', '.join(foreign)}")
    shapes = expected_shapes(config)
    names = tensor_names(config)
    expert_names = {f"blocks.{i}.mlp.experts.{e}.{proj}.{part}"
                    for i in range(config.n_layers) for e in range(config.n_experts)
                    for proj in _EXPERT_PROJECTIONS for part in ("weight", "bias")[:1 + config.mlp_bias]}
    extra = sorted(set(state_dict) - set(names) - expert_names)
    missing = sorted((set(names) | expert_names) - set(state_dict))
    if extra or missing:
        raise GGUFError(f"state dict does not match the config: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}")

    def array(ours: str) -> np.ndarray:
        w = state_dict[ours].detach().to(device="cpu", dtype=torch.float32).numpy()
        if w.shape != shapes[ours]:
            raise GGUFError(f"{ours} has shape {tuple(w.shape)}, the config implies {shapes[ours]}")
        if not np.isfinite(w).all():
            raise GGUFError(f"{ours} contains NaN or infinite values")
        heads = _permuted_heads(ours, config)
        return _permute_rows(w, heads, to_gguf=True) if heads else w

    tensors = [_encode_weight(theirs, array(ours), dtype) for ours, theirs in names.items()]
    for i in range(config.n_layers):
        for proj, stacked in _EXPERT_PROJECTIONS.items() if config.n_experts else ():
            for part in ("weight", "bias")[:1 + config.mlp_bias]:
                w = np.stack([array(f"blocks.{i}.mlp.experts.{e}.{proj}.{part}")
                              for e in range(config.n_experts)])
                tensors.append(_encode_weight(f"blk.{i}.{stacked}.{part}", w, dtype))

    provenance = config.extra.get("gguf")
    gguf_name = provenance.get("name") if isinstance(provenance, dict) else None
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": name or gguf_name or "lmforge model",
        "general.file_type": _FILE_TYPES[dtype],
    }
    if dtype == "q8_0":
        metadata["general.quantization_version"] = 2
    metadata |= gguf_hyperparameters(config)
    metadata |= dict(tokenizer_metadata)
    return write_gguf(path, metadata, tensors)
