"""Hostile model files: each one is refused with one typed error that names the problem.

Every case here once ended in a traceback from deep inside json, torch or numpy (or,
worse, loaded): a safetensors header nested 100,000 deep, float bytes labelled I32,
two tensors sharing bytes, a config.json with NaN or `"hidden_size": true`, a GGUF
whose tensors overlap or whose dims overflow int64. The CLI prints a `ValueError` as
one line, so each error type must be one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.formats.gguf import GGUF_MAGIC, GGUFError, GGUFFile
from lmforge.model.checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

LLAMA = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
             position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False,
             norm_bias=False, tie_embeddings=True)
WEIGHTS = "model.safetensors"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    config = ModelConfig(**LLAMA)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", Transformer(config), config)


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _only_error(call, error=CheckpointError) -> str:
    """Runs `call`, which must raise exactly `error` (a ValueError: one line in the CLI)."""
    with pytest.raises(error) as caught:
        call()
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------- safetensors headers
def test_deeply_nested_safetensors_header_is_a_checkpoint_error(folder):
    nested = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    _write(folder / WEIGHTS, nested, b"")
    message = _only_error(lambda: load_checkpoint(folder))
    assert "model.safetensors" in message and "nested" in message


def test_tensors_sharing_bytes_are_refused_naming_both(folder):
    header, data = _header(folder / WEIGHTS)
    shared = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = shared
    _write(folder / WEIGHTS, header, data)
    message = _only_error(lambda: load_checkpoint(folder))
    assert "overlap" in message
    assert "model.norm.weight" in message and "model.layers.0.input_layernorm.weight" in message


def test_bytes_that_belong_to_no_tensor_are_refused(folder):
    header, data = _header(folder / WEIGHTS)
    _write(folder / WEIGHTS, header, data + b"\0" * 16)
    assert "after the last tensor" in _only_error(lambda: load_checkpoint(folder))


def test_duplicate_tensor_names_are_refused(folder):
    header, data = _header(folder / WEIGHTS)
    text = json.dumps(header)
    entry = json.dumps(header["model.norm.weight"])
    _write(folder / WEIGHTS, (text[:-1] + f', "model.norm.weight": {entry}}}').encode(), data)
    assert "'model.norm.weight' appears twice" in _only_error(lambda: load_checkpoint(folder))


@pytest.mark.parametrize("header", [
    b'{"a": ' + b"9" * 5000 + b"}",  # Python refuses 4,300+ digit integers with a bare ValueError
    b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',  # a bool is not a size
    b'{"__metadata__": {"format": 1}}',  # metadata values are strings
])
def test_odd_headers_are_refused(folder, header):
    _write(folder / WEIGHTS, header, b"\0" * 4)
    assert "corrupt safetensors header" in _only_error(lambda: load_checkpoint(folder))


# ---------------------------------------------------------------------------------- dtypes
def test_float_bytes_labelled_i32_are_refused_naming_tensor_and_dtype(folder):
    header, data = _header(folder / WEIGHTS)
    header["model.embed_tokens.weight"]["dtype"] = "I32"  # same 4 bytes per value, wrong meaning
    _write(folder / WEIGHTS, header, data)
    message = _only_error(lambda: load_checkpoint(folder))
    assert "'model.embed_tokens.weight' is stored as I32" in message and "floating-point" in message


@pytest.mark.parametrize("cast", [lambda t: t.to(torch.int32), lambda t: t > 0, lambda t: t.to(torch.uint8)])
def test_integer_or_bool_weights_are_refused(folder, cast):
    tensors = load_file(folder / WEIGHTS)
    tensors["model.norm.weight"] = cast(tensors["model.norm.weight"])
    save_file(tensors, folder / WEIGHTS)
    assert "'model.norm.weight' is stored as" in _only_error(lambda: load_checkpoint(folder))


def test_float64_and_bfloat16_weights_still_load(folder):
    tensors = load_file(folder / WEIGHTS)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].bfloat16()
    save_file(tensors, folder / WEIGHTS)
    model, _ = load_checkpoint(folder, dtype=torch.float32)
    assert model.final_norm.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------- config files
def _hf_config(folder: Path, **changes) -> None:
    (folder / "lmforge.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("changes,message", [
    ({"rms_norm_eps": float("nan")}, "NaN is not a JSON number"),
    ({"rope_theta": float("inf")}, "Infinity is not a JSON number"),
    ({"hidden_size": True}, "hidden_size=True .* must be an integer"),
    ({"rms_norm_eps": [1e-5]}, "rms_norm_eps=.* must be a finite number"),
    ({"model_type": ["llama"]}, "model_type must be a string"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ({"rope_scaling": [1]}, "rope_scaling=.* must be an object"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor=.* finite number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings=.* true or false"),
    ({"layer_types": 5}, "layer_types=5 .* must be a list"),
    ({"eos_token_id": "</s>"}, "eos_token_id=.* token id"),
])
def test_hostile_config_json_values_are_named(folder, changes, message):
    _hf_config(folder, **changes)
    text = _only_error(lambda: load_config(folder))
    assert __import__("re").search(message, text), text


@pytest.mark.parametrize("name", ["config.json", "lmforge.json", "model.safetensors.index.json"])
def test_deeply_nested_json_files_are_refused(folder, name):
    if name == "model.safetensors.index.json":
        (folder / WEIGHTS).rename(folder / "model-00001.safetensors")
    if name == "config.json":
        (folder / "lmforge.json").unlink()  # else lmforge.json is read first
    (folder / name).write_text('{"a": ' + "[" * 10_000 + "]" * 10_000 + "}")
    assert "nested" in _only_error(lambda: load_checkpoint(folder))


@pytest.mark.parametrize("change,message", [
    ({"norm_eps": float("nan")}, "norm_eps is not a finite number"),
    ({"rope_scaling": {"type": "linear", "factor": float("inf")}}, "rope_scaling.factor is not a finite"),
    ({"rope_scaling": [1]}, "invalid model config"),
    ({"d_model": True}, "invalid model config"),
    ({"n_kv_heads": "2"}, "invalid model config"),
])
def test_hostile_lmforge_json_config_values_are_named(folder, change, message):
    info = json.loads((folder / "lmforge.json").read_text())
    info["config"].update(change)
    (folder / "lmforge.json").write_text(json.dumps(info))
    assert message in _only_error(lambda: load_config(folder))


def test_lmforge_json_may_keep_an_infinity_outside_the_config(folder):
    info = json.loads((folder / "lmforge.json").read_text())
    info["extra"] = {"best_loss": float("inf")}  # what json.dumps writes for a run that never evaluated
    (folder / "lmforge.json").write_text(json.dumps(info))
    load_checkpoint(folder)


def test_unhashable_tensor_naming_in_lmforge_json_is_named(folder):
    info = json.loads((folder / "lmforge.json").read_text())
    info["weights"]["names"] = ["llama"]
    (folder / "lmforge.json").write_text(json.dumps(info))
    assert "unknown tensor naming" in _only_error(lambda: load_config(folder))


# ---------------------------------------------------------------------------------- GGUF
def _gguf(path: Path, tensors: list[tuple[str, list[int], int]], metadata: bytes = b"",
          n_kv: int = 0) -> Path:
    """A GGUF v3 file of F32 tensors (name, dims innermost-first, data offset) over 4 KiB of zeros."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), n_kv) + metadata
    for name, dims, offset in tensors:
        head += string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        head += struct.pack("<IQ", 0, offset)  # F32 at this offset into the data
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(4096))
    return path


def test_gguf_a_well_formed_file_opens(tmp_path):
    gguf = GGUFFile(_gguf(tmp_path / "ok.gguf", [("a", [16], 0), ("b", [16], 64)]))
    assert np.array_equal(gguf.tensor("b"), np.zeros(16, np.float32))


@pytest.mark.parametrize("offsets", [(0, 32), (0, 0), (64, 32)])
def test_gguf_overlapping_tensors_are_refused_naming_both(tmp_path, offsets):
    path = _gguf(tmp_path / "overlap.gguf", [("first", [16], offsets[0]), ("second", [16], offsets[1])])
    message = _only_error(lambda: GGUFFile(path), GGUFError)
    assert "overlap" in message and "'first'" in message and "'second'" in message


@pytest.mark.parametrize("dims", [[2**32, 2**32], [2**63, 2], [2**64 - 1]])
def test_gguf_sizes_that_overflow_int64_are_refused(tmp_path, dims):
    path = _gguf(tmp_path / "huge.gguf", [("a", dims, 0)])
    assert "runs past the end of the file" in _only_error(lambda: GGUFFile(path), GGUFError)


def test_gguf_data_offset_past_the_end_is_refused(tmp_path):
    path = _gguf(tmp_path / "far.gguf", [("a", [16], 2**63)])
    assert "runs past the end of the file" in _only_error(lambda: GGUFFile(path), GGUFError)


def test_gguf_deeply_nested_metadata_arrays_are_refused(tmp_path):
    key = struct.pack("<Q", 4) + b"deep" + struct.pack("<I", 9)  # ARRAY
    nested = struct.pack("<IQ", 9, 1) * 50_000 + struct.pack("<IQ", 4, 0)  # arrays of arrays of ...
    path = _gguf(tmp_path / "deep.gguf", [], key + nested, n_kv=1)
    assert "nests arrays" in _only_error(lambda: GGUFFile(path), GGUFError)


def test_gguf_array_longer_than_the_file_fails_at_once(tmp_path):
    key = struct.pack("<Q", 3) + b"arr" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 2**62)
    path = _gguf(tmp_path / "long.gguf", [], key, n_kv=1)
    assert "claims" in _only_error(lambda: GGUFFile(path), GGUFError)


def test_gguf_duplicate_metadata_keys_are_refused(tmp_path):
    entry = struct.pack("<Q", 1) + b"k" + struct.pack("<II", 4, 7)  # k: UINT32 7
    path = _gguf(tmp_path / "dup.gguf", [], entry + entry, n_kv=2)
    assert "'k' appears twice" in _only_error(lambda: GGUFFile(path), GGUFError)
