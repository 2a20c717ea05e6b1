"""Quantized folders: written atomically, read back into the same integers, refused when damaged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.align.conftest import byte_tokenizer
from tests.compress.conftest import tiny_lm

from lmforge.compress.grid import Grid
from lmforge.compress.quantize import quantize_model
from lmforge.infer.engine import Engine
from lmforge.infer.loading import load_model
from lmforge.infer.quant import Int4Linear, Int8Linear
from lmforge.infer.quantized_folder import is_quantized_folder, load_quantized, save_quantized
from lmforge.infer.sampling import SamplingParams
from lmforge.model.checkpoint import CheckpointError

IDS = torch.tensor([[5, 9, 200, 31, 7, 7, 64]])


@pytest.fixture
def quantized(tmp_path):
    model = tiny_lm()
    quantize_model(model, "rtn", Grid(4, 32))
    return save_quantized(tmp_path / "q", model, tokenizer=byte_tokenizer(), report={"method": "rtn"}), model


def test_a_quantized_folder_loads_into_the_same_integers_and_logits(quantized):
    folder, model = quantized
    assert is_quantized_folder(folder) and not (folder / "config.json").exists()
    loaded = load_quantized(folder)
    layer = loaded.blocks[1].mlp.down_proj
    assert isinstance(layer, Int4Linear) and torch.equal(layer.packed, model.blocks[1].mlp.down_proj.packed)
    assert isinstance(loaded.lm_head, Int8Linear)
    # tied embeddings: only the int8 head is stored; the lookup table is its dequantized copy
    assert "embed.weight" not in load_file(folder / "model.safetensors")
    assert torch.equal(loaded.embed.weight, model.lm_head.dequantize())
    with torch.no_grad():  # the quantized model in memory is the one on disk, lookup table included
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_generate_and_the_engine_open_a_quantized_folder(quantized):
    folder, _ = quantized
    loaded = load_model(folder)
    assert isinstance(loaded.model.blocks[0].attn.q_proj, Int4Linear)
    engine = Engine.from_pretrained(folder)
    reply = engine.complete(["hello"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert reply.finish_reason in ("stop", "length") and reply.token_ids


def test_damaged_quantized_folders_are_refused_by_name(quantized):
    folder, _ = quantized
    tensors = load_file(folder / "model.safetensors")
    tensors["blocks.0.attn.q_proj.dm"] = tensors["blocks.0.attn.q_proj.dm"].float()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="blocks.0.attn.q_proj.dm is stored as torch.float32"):
        load_quantized(folder)
    del tensors["blocks.0.attn.q_proj.dm"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors blocks.0.attn.q_proj.dm"):
        load_quantized(folder)
    info = json.loads((folder / "lmforge.json").read_text())
    info["quantized_layers"]["blocks.0.attn.q_proj"]["group_size"] = 48
    (folder / "lmforge.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="impossible group size 48"):
        load_quantized(folder)
