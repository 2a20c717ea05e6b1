"""GGUF: llama.cpp's single-file container for a model's metadata and tensors.

A GGUF file is a header ("GGUF", version, counts), typed metadata key/values, one
record per tensor (name, dims, ggml type, offset), then the tensor bytes, each tensor
aligned to `general.alignment`. `GGUFFile` reads versions 2 and 3 through `np.memmap`
(opening a large file costs only its header); `write_gguf` writes version 3 atomically.

The container knows nothing of models or tokenizers: lmforge.model.gguf maps tensors to
a `Transformer`, lmforge.tokenizer.gguf_meta maps `tokenizer.ggml.*` keys to a tokenizer.
"""

from __future__ import annotations

import enum
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_write
from lmforge.formats.ggml import BLOCK_LAYOUT, DEQUANTIZERS, GGMLError, GGMLType, dequantize, tensor_nbytes

GGUF_MAGIC = b"GGUF"
READABLE_VERSIONS = (2, 3)
WRITTEN_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most four dimensions
MAX_ARRAY_DEPTH = 8  # arrays of arrays of ...: real files nest at most 2 deep; a deeper one is hostile


class GGUFError(GGMLError):
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
        return math.prod(self.shape)


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

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, tuple[ValueType, ...]]:
        """One metadata value and its type path, e.g. (ARRAY, STRING) for a list of strings."""
        if depth > MAX_ARRAY_DEPTH:
            raise GGUFError(f"{self.source}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep "
                            "(corrupt or hostile file)")
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
        least = {ValueType.STRING: 8, ValueType.ARRAY: 12}.get(item_type, 0)  # bytes per item, at least
        if count * least > len(self.buffer) - self.pos:  # fail now, not after looping over the whole file
            raise GGUFError(f"{self.source}: truncated file: {what} claims {count:,} items, more than the "
                            f"{len(self.buffer) - self.pos:,} bytes left can hold")
        if item_type == ValueType.STRING:
            return self.strings(count, what), (ValueType.ARRAY, ValueType.STRING)
        if item_type == ValueType.ARRAY:
            items, inner = [], (ValueType.ARRAY,)
            for i in range(count):
                item, inner = self.value(item_type, f"{what}[{i}]", depth + 1)
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
            if key in self.metadata:
                raise GGUFError(f"{self.path}: metadata key {key!r} appears twice")
            value, types = cur.value(cur.u32(f"type of {key}"), f"metadata {key!r}")
            self.metadata[key], self.metadata_types[key] = value, types

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
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
        self._check_no_overlap()

    def _check_no_overlap(self) -> None:
        """Each tensor owns its bytes: two tensors sharing data would make editing one change the other."""
        previous: TensorInfo | None = None
        for info in sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            if info.nbytes == 0:
                continue
            if previous is not None and info.offset < previous.offset + previous.nbytes:
                first = f"{previous.name!r} (bytes {previous.offset}..{previous.offset + previous.nbytes})"
                second = f"{info.name!r} (bytes {info.offset}..{info.offset + info.nbytes})"
                raise GGUFError(f"{self.path}: tensors {first} and {second} overlap: corrupt or hostile file")
            previous = info

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
