"""`parse_json`: what Python's json lets through (or crashes on) becomes one `JSONInputError`."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors, read_header
from lmforge.formats.strictjson import JSONInputError, nesting_depth, parse_json, read_json


@pytest.mark.parametrize("text,depth", [
    ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('{"a": "[[[[{{{{"}', 1),
    ('["\\"[[["]', 1), ("[" * 5000 + "]" * 5000, 5000),
])
def test_nesting_depth_ignores_brackets_inside_strings(text, depth):
    assert nesting_depth(text.encode()) == depth


def test_deep_nesting_is_refused_before_parsing():
    with pytest.raises(JSONInputError, match="nested 100000 levels deep"):
        parse_json("[" * 100_000 + "]" * 100_000, "x.json")


@pytest.mark.parametrize("text,message", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1e999}', "out of range"),
    ('{"a": 1, "a": 2}', "'a' appears twice"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
    ("{not json", "not valid JSON"),
    (b'"\xff"', "not UTF-8"),
])
def test_what_pythons_json_accepts_or_crashes_on_is_refused(text, message):
    with pytest.raises(JSONInputError, match=message) as caught:
        parse_json(text, "cfg.json")
    assert str(caught.value).startswith("cfg.json: ")


def test_lmforge_files_may_hold_what_json_dumps_writes():
    text = json.dumps({"clip": float("inf")})
    assert parse_json(text, "s.json", allow_nonfinite=True) == {"clip": float("inf")}


def test_read_json_bounds_the_size_and_names_missing_files(tmp_path):
    (tmp_path / "big.json").write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(JSONInputError, match="over the 100-byte limit"):
        read_json(tmp_path / "big.json", max_bytes=100)
    with pytest.raises(JSONInputError, match="cannot read it"):
        read_json(tmp_path / "missing.json")


def test_safetensors_reader_loads_a_good_file_and_refuses_a_gap(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(save({"a": np.arange(4, dtype=np.float32)}, metadata={"k": "v"}))
    tensors, header = load_tensors(path, framework="numpy")
    assert tensors["a"].tolist() == [0, 1, 2, 3] and header.metadata == {"k": "v"}
    text = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(SafetensorsError, match="4 bytes before tensor 'a' belong to no tensor"):
        read_header(path)
