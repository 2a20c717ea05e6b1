"""Loading a GGUF for the engine: Q4_0/Q4_1/Q8_0 matrices read once, straight into int4/int8 layers
that hold the file's own numbers; no float copy of them is ever made."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.align.conftest import byte_tokenizer
from tests.compress.conftest import tiny_lm

from lmforge.formats.ggml import GGMLType, encode_q8_0, quantize_q4_0
from lmforge.formats.gguf import GGUFFile, TensorData, write_gguf
from lmforge.infer.engine import Engine
from lmforge.infer.loading import load_model
from lmforge.infer.quant import Int4Linear, Int8Linear
from lmforge.infer.sampling import SamplingParams
from lmforge.model.gguf import export_gguf, load_gguf_model, read_gguf_model

PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")


def gguf_of(tmp_path, dtype: str, name: str = "tiny.gguf"):
    model = tiny_lm(vocab_size=259)  # the byte tokenizer's 259 tokens
    tokenizer = byte_tokenizer().gguf_metadata()
    return export_gguf(tmp_path / name, model.config, model.state_dict(), tokenizer, dtype)


@pytest.mark.parametrize(("dtype", "layer", "kind"), [
    ("q8_0", Int8Linear, "Q8_0"), ("q4_0", Int4Linear, "Q4_0"), ("q4_1", Int4Linear, "Q4_1")])
def test_block_matrices_become_int_layers_holding_the_files_numbers(tmp_path, dtype, layer, kind):
    path = gguf_of(tmp_path, dtype)
    _, floats, _ = load_gguf_model(path)  # every tensor dequantized: the file's weights, for comparison
    model = load_model(path, keep=("int4", "int8")).model
    for i in range(2):
        for name in PROJECTIONS:
            module = model.get_submodule(f"blocks.{i}.{name}")
            assert isinstance(module, layer) and module.group_size == 32, name
            assert torch.equal(module.dequantize(), floats[f"blocks.{i}.{name}.weight"]), name
    assert isinstance(model.lm_head, Int8Linear)  # the tied embedding is Q8_0 under every type here
    assert torch.equal(model.lm_head.dequantize(), floats["embed.weight"])
    assert torch.equal(model.embed.weight, floats["embed.weight"])  # the lookup keeps its float rows
    ids = torch.tensor([[5, 9, 200, 31, 7, 7, 64]])
    reference = load_model(path).model  # the same weights in float
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    if kind == "Q4_0":  # w = d (q - 8): the int4 layer's offset is -8 steps
        step, offset = model.blocks[0].attn.q_proj.dm.float().unbind(-1)
        assert torch.equal(offset, -8 * step)


def test_kept_matrices_are_never_dequantized(tmp_path, monkeypatch):
    path = gguf_of(tmp_path, "q4_0")
    dequantized, original = [], GGUFFile.tensor
    monkeypatch.setattr(GGUFFile, "tensor", lambda f, name: dequantized.append(name) or original(f, name))
    gguf = read_gguf_model(path, keep=("int4",))
    assert len(gguf.blocks) == 14 and not [n for n in dequantized if n.startswith("blk.") and "norm" not in n]
    assert "token_embd.weight" in dequantized  # Q8_0, not kept as int4: the lookup table in float
    assert set(gguf.state).isdisjoint(gguf.blocks)


def test_a_fused_group_of_mixed_kinds_is_loaded_in_float(tmp_path):
    """q/k/v (and gate/up) run as one fused matrix in the engine: a file storing q as Q4_0 but k and
    v as Q8_0 cannot be fused, so those three come in float and are quantized alike later."""
    path = gguf_of(tmp_path, "q8_0")
    f = GGUFFile(path)
    tensors = []
    for info in f.tensors.values():
        data, kind = np.asarray(f.raw(info.name)), info.ggml_type
        if info.name == "blk.0.attn_q.weight":
            data, kind = quantize_q4_0(f.tensor(info.name)), GGMLType.Q4_0
        tensors.append(TensorData(info.name, info.shape, kind, data))
    mixed = write_gguf(tmp_path / "mixed.gguf", f.metadata, tensors, types=f.metadata_types)
    model = load_model(mixed, keep=("int4", "int8")).model
    first, second = model.blocks[0].attn, model.blocks[1].attn
    assert all(isinstance(getattr(first, n), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(first.o_proj, Int8Linear) and isinstance(second.q_proj, Int8Linear)
    engine = Engine.from_pretrained(mixed, quantize="int4")  # the float ones quantized alike: it fuses
    assert isinstance(engine.model.blocks[0].attn.v_proj, Int4Linear)
    assert engine.complete([[5, 9, 200]], SamplingParams(temperature=0, max_tokens=4))[0].token_ids


def test_the_engine_keeps_a_q8_0_files_numbers_under_either_mode(tmp_path):
    path = gguf_of(tmp_path, "q8_0")
    _, floats, _ = load_gguf_model(path)
    for mode in ("int8", "int4"):  # the mode quantizes only what the file holds in other types
        engine = Engine.from_pretrained(path, quantize=mode)
        down = engine.model.blocks[1].mlp.down_proj
        assert isinstance(down, Int8Linear)
        assert torch.equal(down.dequantize(), floats["blocks.1.mlp.down_proj.weight"])
    # and its per-32 scales are what `encode_q8_0` writes back: the file's very bytes
    assert np.array_equal(encode_q8_0(down.qweight.numpy(), down.scale.numpy()).ravel(),
                          np.asarray(GGUFFile(path).raw("blk.1.ffn_down.weight")))
