"""JSON from files lmforge did not write: bounded in size and nesting, strict in what it accepts.

Python's `json` is lenient where a hostile file can hurt: it recurses once per nesting
level, so `[[[[...` ten thousand deep raises `RecursionError` from inside the parser; it
reads `NaN` and `Infinity` (not JSON) and turns `1e999` into `inf`; it keeps the last of
two equal keys without a word; and it stops at integers past 4,300 digits with a bare
`ValueError`. `parse_json` first measures the nesting depth (strings cut out, then one
vectorized pass over the brackets), then parses with hooks that refuse each of the rest,
so every bad document becomes one `JSONInputError` that names the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

MAX_DEPTH = 64  # tokenizer.json nests about 6 deep, a safetensors header 3, config.json 4
MAX_BYTES = 1 << 30  # tokenizer.json of a 256k vocabulary is ~20 MB

# A JSON string literal, written as the "unrolled loop" so the regex engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
_CHUNK = 1 << 22


class JSONInputError(ValueError):
    """A JSON file that is malformed, too large or too deeply nested to read safely."""

    def __init__(self, source: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = str(source), reason


class _Refused(ValueError):
    """Raised by the parser's hooks; `parse_json` turns it into a `JSONInputError` naming the file."""


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON document, found without recursing."""
    if raw.count(b"[") + raw.count(b"{") <= 1:
        return int(b"[" in raw or b"{" in raw)
    codes = np.frombuffer(_STRING.sub(b"", raw), np.uint8)
    deepest = level = 0
    for start in range(0, len(codes), _CHUNK):  # chunks keep the running sum small in memory
        chunk = codes[start:start + _CHUNK]
        steps = np.isin(chunk, _OPEN).astype(np.int32) - np.isin(chunk, _CLOSE)
        levels = np.cumsum(steps) + level
        if len(levels):
            deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def parse_json(raw: bytes | str, source: str | os.PathLike[str], *, max_depth: int = MAX_DEPTH,
               allow_nonfinite: bool = False) -> Any:
    """The value of a JSON document, or `JSONInputError` saying what is wrong with it.

    `allow_nonfinite=True` reads the NaN/Infinity that Python's own `json.dumps` writes,
    for lmforge's files that may legitimately hold one (a run config's clip of inf).
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    depth = nesting_depth(data)
    if depth > max_depth:
        raise JSONInputError(source, f"JSON nested {depth} levels deep (the limit is {max_depth}): "
                                     "corrupt or hostile file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JSONInputError(source, f"not valid JSON (not UTF-8 text: {err})") from err
    try:
        if allow_nonfinite:
            return json.loads(text, object_pairs_hook=_unique_keys)
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except _Refused as err:
        raise JSONInputError(source, str(err)) from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or an integer of 4,300+ digits
        raise JSONInputError(source, f"not valid JSON ({err})") from err


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH,
              allow_nonfinite: bool = False) -> Any:
    """`parse_json` of a file, refusing files over `max_bytes` before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise JSONInputError(path, f"{size:,} bytes, over the {max_bytes:,}-byte limit for a JSON file")
        raw = path.read_bytes()
    except OSError as err:
        raise JSONInputError(path, f"cannot read it ({err.strerror or err})") from err
    return parse_json(raw, path, max_depth=max_depth, allow_nonfinite=allow_nonfinite)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"key {key!r} appears twice in one object")
            seen.add(key)
    return out


def _no_constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:40]} is out of range for a float")
    return value
