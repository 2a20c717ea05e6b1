"""A damaged trainer_state/ is one `ResumeError` naming the part, and leaves the RNG untouched."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.checkpoint import ResumeError, read_training_checkpoint, save_training_checkpoint

CONFIG = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, position="rope",
              norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, ModelConfig]:
    config = ModelConfig(**CONFIG)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    # an inf in the run config is what json.dumps writes as Infinity: lmforge's own file must still read
    state = {"tokens_seen": 4, "data": {"epoch": 0}, "config": {"clip": float("inf")}}
    folder = save_training_checkpoint(tmp_path / "run", 1, model, optimizer, state, config=config)
    return folder, config


def test_a_saved_state_reads_back(saved):
    folder, config = saved
    _, optimizer_state, state = read_training_checkpoint(folder, config)
    assert state["step"] == 1 and state["config"]["clip"] == float("inf") and optimizer_state["state"]


def _refused(folder: Path, config: ModelConfig) -> str:
    before = (torch.get_rng_state(), random.getstate())
    with pytest.raises(ResumeError) as caught:
        read_training_checkpoint(folder, config)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_deeply_nested_optimizer_header_is_refused(saved):
    folder, config = saved
    header = b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    (folder / "trainer_state" / "optimizer.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert "optimizer.safetensors" in _refused(folder, config)


def test_a_truncated_rng_file_is_refused(saved):
    folder, config = saved
    rng = folder / "trainer_state" / "rng.safetensors"
    rng.write_bytes(rng.read_bytes()[:-100])
    assert "rng.safetensors" in _refused(folder, config)


@pytest.mark.parametrize("change", [
    lambda t: t.update({"torch": t["torch"][:100]}),  # a short torch RNG state
    lambda t: t.update({"numpy.keys": t["numpy.keys"][:10]}),
    lambda t: t.pop("torch"),
])
def test_a_wrong_rng_state_is_refused_before_any_rng_changes(saved, change):
    folder, config = saved
    path = folder / "trainer_state" / "rng.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    assert "RNG state" in _refused(folder, config)


@pytest.mark.parametrize("edit,message", [
    (lambda s: [1, 2], "not a JSON object"),
    (lambda s: s | {"step": "1"}, "'step' must be a non-negative integer"),
    (lambda s: s | {"rng": {"python": [3, [1, 2], None], "numpy": s["rng"]["numpy"]}}, "RNG state"),
    (lambda s: s | {"optimizer": {"scalars": [], "param_groups": []}}, "optimizer's scalars"),
    (lambda s: s | {"data": None}, "data position"),
])
def test_a_malformed_state_json_is_named(saved, edit, message):
    folder, config = saved
    path = folder / "trainer_state" / "state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert message in _refused(folder, config)


def test_optimizer_tensors_with_foreign_names_are_refused(saved):
    folder, config = saved
    path = folder / "trainer_state" / "optimizer.safetensors"
    save_file(load_file(path) | {"mystery": torch.zeros(2)}, path)
    assert "'mystery'" in _refused(folder, config)
