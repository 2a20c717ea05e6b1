"""Checkpoint folders: round trips, atomic replacement, and a clear error for every bad input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import atomic
from lmforge.model import checkpoint
from lmforge.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_config,
    read_safetensors_header,
    save_checkpoint,
)
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

LLAMA = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
             position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False,
             norm_bias=False, tie_embeddings=True)


def _model(**overrides) -> tuple[Transformer, ModelConfig]:
    config = ModelConfig(**(LLAMA | overrides))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, config


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _saved(tmp_path: Path, **overrides) -> tuple[Path, Transformer, ModelConfig]:
    model, config = _model(**overrides)
    return save_checkpoint(tmp_path / "ckpt", model, config), model, config


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("overrides", [
    {},  # llama, tied: HF names
    {"position": "alibi"},  # lmforge-native
    {"n_experts": 4, "n_experts_per_token": 2, "tie_embeddings": False},  # mixtral names
    {"position": "learned", "norm": "layernorm", "norm_bias": True, "mlp": "gelu_tanh", "qkv_bias": True,
     "out_bias": True, "mlp_bias": True, "n_kv_heads": None},  # gpt2: Conv1D transposes
])
def test_round_trip_keeps_every_tensor_and_the_config(tmp_path, overrides):
    folder, model, config = _saved(tmp_path, **overrides)
    loaded, loaded_config = load_checkpoint(folder)
    _assert_same_state(model, loaded)
    assert loaded_config.to_dict() == config.to_dict()
    assert not loaded.training
    assert load_config(folder).to_dict() == config.to_dict()


def test_folder_contents_and_provenance(tmp_path):
    class FakeTokenizer:
        bos_token_id, eos_token_id = 1, 2

        def save(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    model, config = _model()
    folder = save_checkpoint(tmp_path / "ckpt", model, config, tokenizer=FakeTokenizer(),
                             generation_config={"temperature": 0.7}, extra={"source": "unit test", "step": 3})
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "lmforge.json", "model.safetensors", "tokenizer.json"]
    info = json.loads((folder / "lmforge.json").read_text())
    assert info["config"] == config.to_dict()
    assert info["source"] == "unit test" and info["extra"]["step"] == 3
    assert info["lmforge_version"] and info["created"].endswith("+00:00")
    assert info["weights"]["names"] == "llama"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7}
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["eos_token_id"] == 2
    names = read_safetensors_header(folder / "model.safetensors")
    assert "lm_head.weight" not in names  # tied: stored once, as transformers does
    assert names["model.embed_tokens.weight"]["shape"] == [96, 32]
    assert names["model.embed_tokens.weight"]["dtype"] == "F32"


def test_dtype_on_save_and_on_load(tmp_path):
    model, config = _model()
    folder = save_checkpoint(tmp_path / "ckpt", model, config, dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v["dtype"] for v in read_safetensors_header(folder / "model.safetensors").values()} == {"BF16"}
    as_stored, _ = load_checkpoint(folder)
    assert as_stored.embed.weight.dtype == torch.bfloat16
    assert as_stored.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    widened, _ = load_checkpoint(folder, dtype=torch.float32)
    assert widened.embed.weight.dtype == torch.float32
    assert torch.equal(widened.embed.weight, model.embed.weight.to(torch.bfloat16).float())
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert as_stored(ids).logits.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_checkpoint(folder, dtype="float8")


def test_sharded_weights_load(tmp_path):
    folder, model, _ = _saved(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file_name, part in halves.items():
        save_file({n: tensors[n] for n in part}, folder / file_name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    loaded, _ = load_checkpoint(folder)
    _assert_same_state(model, loaded)

    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not contain it"):
        load_checkpoint(folder)
    index["weight_map"][names[0]] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file in this folder"):
        load_checkpoint(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    index["weight_map"][names[0]] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no such safetensors file"):
        load_checkpoint(folder)


def test_hf_folder_without_lmforge_json_loads_through_config_json(tmp_path):
    folder, model, config = _saved(tmp_path)
    (folder / "lmforge.json").unlink()
    loaded, loaded_config = load_checkpoint(folder)
    _assert_same_state(model, loaded)
    assert loaded_config.extra["hf"]["model_type"] == "llama"
    assert loaded_config.to_dict() | {"extra": {}} == config.to_dict() | {"extra": {}}


def test_native_folder_without_lmforge_json_loads_through_config_json(tmp_path):
    folder, model, _ = _saved(tmp_path, position="alibi")
    (folder / "lmforge.json").unlink()
    loaded, _ = load_checkpoint(folder)
    _assert_same_state(model, loaded)


def test_save_checks_the_state_dict_against_the_config(tmp_path):
    model, config = _model()
    state = model.state_dict()
    state.pop("final_norm.weight")
    with pytest.raises(CheckpointError, match="missing tensor.*final_norm.weight"):
        save_checkpoint(tmp_path / "ckpt", state, config)
    wider = ModelConfig(**(LLAMA | {"d_ff": 80}))
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.up_proj.weight: checkpoint has \(64, 32\), "
                                              r"config expects \(80, 32\)"):
        save_checkpoint(tmp_path / "ckpt", model, wider)
    with pytest.raises(CheckpointError, match="cannot be written as gpt2"):
        save_checkpoint(tmp_path / "ckpt", model, config, hf_family="gpt2")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------- atomic writes
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    folder, old_model, _ = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    new_model, new_config = _model(d_ff=80)

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, new_model, new_config)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _leftovers(tmp_path) == []
    loaded, _ = load_checkpoint(folder)
    _assert_same_state(old_model, loaded)


def test_failure_in_tokenizer_save_of_a_new_folder_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{half")
            raise RuntimeError("tokenizer exploded")

    model, config = _model()
    with pytest.raises(RuntimeError, match="exploded"):
        save_checkpoint(tmp_path / "ckpt", model, config, tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_restores_the_old_folder(tmp_path, monkeypatch):
    folder, old_model, _ = _saved(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)  # the folder swap lives in lmforge.atomic
    new_model, new_config = _model(d_ff=80)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(folder, new_model, new_config)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert _leftovers(tmp_path) == []
    loaded, _ = load_checkpoint(folder)
    _assert_same_state(old_model, loaded)


def test_successful_overwrite_replaces_the_folder_whole(tmp_path):
    folder, _, _ = _saved(tmp_path)
    (folder / "stale.txt").write_text("from the old checkpoint")
    new_model, new_config = _model(d_ff=80)
    save_checkpoint(folder, new_model, new_config)
    assert not (folder / "stale.txt").exists()
    assert _leftovers(tmp_path) == []
    loaded, config = load_checkpoint(folder)
    assert config.d_ff == 80
    _assert_same_state(new_model, loaded)


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    model, config = _model()
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_checkpoint(precious, model, config)
    assert (precious / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------------------------- bad inputs
def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(tmp_path / "empty")
    folder, _, _ = _saved(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(folder)


@pytest.mark.parametrize("corrupt,message", [
    (lambda data: b"\x01\x02\x03", "truncated or not safetensors"),
    (lambda data: b"garbage!" * 512, "corrupt safetensors header"),
    (lambda data: struct.pack("<Q", 64) + b"\xff\xfe garbage " * 40, "not valid JSON"),
    (lambda data: struct.pack("<Q", 2**40) + data[8:], "over the 100 MB limit"),
    (lambda data: struct.pack("<Q", len(data)) + data[8:], "claims .* but the file has only"),
    (lambda data: data[:8] + b"!" + data[9:], "not valid JSON"),
    (lambda data: data[: len(data) - 100], "truncated"),
])
def test_corrupt_safetensors_files(tmp_path, corrupt, message):
    folder, _, _ = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(weights)


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    folder, _, _ = _saved(tmp_path)
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.mlp.down_proj.weight"):
        load_checkpoint(folder)

    folder, _, _ = _saved(tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model.layers.0.mystery.weight"):
        load_checkpoint(folder)

    folder, _, _ = _saved(tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    mismatch = r"model.norm.weight: checkpoint has \(31,\), config expects \(32,\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_checkpoint(folder)


def test_native_checkpoint_shape_mismatch_is_named(tmp_path):
    folder, _, _ = _saved(tmp_path, position="alibi")
    _rewrite_weights(folder, lambda t: t.update({"embed.weight": torch.zeros(95, 32)}))
    mismatch = r"embed.weight: checkpoint has \(95, 32\), config expects \(96, 32\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_checkpoint(folder)


def test_unknown_architecture_and_bad_json(tmp_path):
    folder, _, _ = _saved(tmp_path)
    (folder / "lmforge.json").unlink()
    bert = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    (folder / "config.json").write_text(json.dumps(bert))
    with pytest.raises(CheckpointError, match="unknown architecture.*BertForMaskedLM"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        load_checkpoint(folder)
    (folder / "lmforge.json").write_text(json.dumps({"config": {"d_model": 32, "warp_drive": True}}))
    with pytest.raises(CheckpointError, match="warp_drive"):
        load_checkpoint(folder)
    (folder / "lmforge.json").write_text("[]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_checkpoint(folder)


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path):
    folder, _, _ = _saved(tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"lm_head.weight": torch.zeros(96, 32)}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_checkpoint(folder)
