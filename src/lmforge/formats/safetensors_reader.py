"""The one door through which lmforge reads a safetensors file it did not just write.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name
-> dtype, shape, data_offsets; an optional `__metadata__` of strings), then the tensor
bytes. `read_header` checks all of it before a byte of tensor data is trusted: the length
against the file size and the format's 100 MB cap, the JSON with a depth bound
(`lmforge.formats.strictjson`), every entry's dtype, shape and byte count, and that the
tensors tile the data region exactly (no overlap, no gap, nothing after the last), which
is the layout the format's own specification requires. `load_tensors` then lets the
safetensors library read the data. Every failure is one `SafetensorsError` naming the
file and what is wrong; model checkpoints, trainer state, token shards and the
curriculum's score cache all come through here.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.formats.strictjson import JSONInputError, parse_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a longer "header" is a corrupt file
HEADER_DEPTH = 4  # {name: {"shape": [...]}} is 3 levels

ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # what weights may be stored as (FP8 needs scales we lack)


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file; the message names the file and the fault."""


@dataclass(frozen=True)
class Header:
    """A checked header: `tensors` maps name -> {"dtype", "shape", "data_offsets"} (from `data_start`)."""

    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """The checked header of a safetensors file, reading no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: truncated or not safetensors ({size} bytes; the format starts "
                                   "with an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: corrupt safetensors header: it claims {header_len:,} bytes, "
                                   f"over the {MAX_HEADER_BYTES // 2**20} MB limit (not a safetensors file?)")
        if 8 + header_len > size:
            raise SafetensorsError(f"{path}: corrupt safetensors header: it claims {header_len:,} bytes but "
                                   f"the file has only {size:,} (truncated, or not a safetensors file)")
        raw = f.read(header_len)
    try:
        header = parse_json(raw, path, max_depth=HEADER_DEPTH)
    except JSONInputError as err:
        raise SafetensorsError(f"{path}: corrupt safetensors header: {err.reason}") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    for name, info in header.items():
        _check_entry(path, name, info)
    _check_layout(path, header, size - 8 - header_len)
    return Header(tensors=header, metadata=metadata, data_start=8 + header_len)


def _check_entry(path: Path, name: str, info: Any) -> None:
    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: corrupt safetensors header: tensor {name!r} {why}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise bad("lacks dtype, shape or data_offsets")
    if info["dtype"] not in ITEM_SIZE:
        raise bad(f"has unknown dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_natural(n) for n in shape)):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEM_SIZE[info["dtype"]]:
        raise bad(f"has {offsets[1] - offsets[0]} bytes of data for shape {shape} {info['dtype']}")


def _natural(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _check_layout(path: Path, header: dict[str, dict[str, Any]], data_size: int) -> None:
    """The tensors must cover bytes [0, data_size) back to back, as the format requires."""
    end, previous = 0, None
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if stop > data_size:
            raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {name!r} ends at byte "
                                   f"{stop:,} of the data but the file holds {data_size:,} (truncated)")
        if begin < end:
            raise SafetensorsError(f"{path}: corrupt safetensors header: tensors {previous!r} and {name!r} "
                                   f"overlap (bytes {begin:,}..{end:,})")
        if begin > end:
            raise SafetensorsError(f"{path}: corrupt safetensors header: {begin - end:,} bytes before tensor "
                                   f"{name!r} belong to no tensor")
        if stop > begin or previous is None:
            end, previous = stop, name
    if end != data_size:
        raise SafetensorsError(f"{path}: corrupt safetensors header: {data_size - end:,} bytes after the "
                               "last tensor belong to no tensor (not a safetensors file, or damaged)")


def load_tensors(
    path: str | os.PathLike[str], names: list[str] | None = None, *, framework: str = "pt",
) -> tuple[dict[str, Any], Header]:
    """(name -> tensor for `names`, or all, on the CPU; the checked header). `framework`: "pt" or "numpy"."""
    path = Path(path)
    header = read_header(path)
    wanted = list(header.tensors) if names is None else names
    missing = [name for name in wanted if name not in header.tensors]
    if missing:
        raise SafetensorsError(f"{path}: has no tensor named {missing[0]!r}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework=framework, device="cpu") as f:
            return {name: f.get_tensor(name) for name in wanted}, header
    except Exception as err:  # the library's own error types vary by version
        raise SafetensorsError(f"{path}: could not read tensors ({err})") from err
