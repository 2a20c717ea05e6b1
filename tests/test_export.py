"""`lmforge export --to gguf --dtype ...`: the block type is the user's choice; a quantized model's own
integers are written as they are where the type can hold them, and re-quantized, said aloud,
where it cannot."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tests.align.conftest import byte_tokenizer
from tests.compress.conftest import tiny_lm

from lmforge.cli import main
from lmforge.compress.grid import Grid
from lmforge.compress.quantize import quantize_model
from lmforge.export import gguf_plan
from lmforge.formats.ggml import GGMLType, dequantize, encode_q4_0
from lmforge.formats.gguf import GGUFFile
from lmforge.infer.quant import Int4Linear, Int8Linear
from lmforge.infer.quantized_folder import save_quantized
from lmforge.model.gguf import load_gguf_model, read_gguf_model


def quantized_model(group: int) -> torch.nn.Module:
    """A tiny Llama (rows of 256, so Q4_K applies) rounded to int4 in groups of `group`, int8 head."""
    model = tiny_lm(vocab_size=259, d_model=256, d_ff=512)
    quantize_model(model, "rtn", Grid(4, group))
    return model


@pytest.fixture
def folder(tmp_path):
    return save_quantized(tmp_path / "q", quantized_model(64), tokenizer=byte_tokenizer())


def test_own_grids_are_written_as_they_are(tmp_path):
    model = quantized_model(32)
    for dtype in (None, "q4_1"):  # the default is the layers' own types; q4_1 is the int4 layers' type
        plan = gguf_plan(model, dtype)
        assert {k.name for k, _ in plan.blocks.values()} == {"Q4_1", "Q8_0"}
        assert not [n for n in plan.notes if "re-quantized" in n]
    q = model.blocks[0].attn.q_proj
    kind, data = plan.blocks["blocks.0.attn.q_proj.weight"]
    assert np.array_equal(dequantize(data, kind, (256, 256)), q.dequantize().numpy())  # bit for bit
    # the int8 head's per-row fp32 scale is rounded to f16 for Q8_0: the one rounding, and said
    rounded = r"int8 scales rounded to f16 .*relative change [0-9.e-]+; codes kept"
    assert any(re.search(rounded, n) for n in plan.notes)


def test_a_symmetric_int4_grid_is_q4_0_and_an_f16_int8_grid_q8_0_exactly():
    model = quantized_model(32)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (256, 256), generator=g, dtype=torch.uint8)
    step = (torch.rand(256, 8, generator=g) / 100).half().float()  # f16 numbers, as a file holds
    model.blocks[0].attn.q_proj = Int4Linear.from_codes(codes, step, -8 * step)  # as read from a Q4_0 file
    grouped = (torch.rand(259, 8, generator=g) / 100).half().float()  # as read from a Q8_0 file
    model.lm_head = Int8Linear(model.lm_head.qweight, grouped)
    plan = gguf_plan(model, "q4_0")
    kind, data = plan.blocks["blocks.0.attn.q_proj.weight"]
    assert kind == GGMLType.Q4_0 and np.array_equal(data, encode_q4_0(codes.numpy(), step.numpy()))
    assert plan.blocks["embed.weight"][0] == GGMLType.Q8_0  # the head stays 8-bit under a 4-bit type
    assert gguf_plan(model).blocks["blocks.0.attn.q_proj.weight"][0] == GGMLType.Q4_0  # smaller, and exact
    assert not [n for n in plan.notes if "scales rounded" in n]  # f16 scales: Q8_0 holds them exactly
    assert "13 quantized layers re-quantized to Q4_0" in " ".join(plan.notes)  # the asymmetric rest


def test_a_grid_the_type_cannot_hold_is_rounded_again_and_said_by_how_much(folder, tmp_path, capsys):
    out = tmp_path / "q4k.gguf"
    assert main(["export", "--model", str(folder), "--to", "gguf", "--dtype", "q4_k", "-o", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "q4_k" and result["tensor_types"] == {"F32": 5, "Q4_K": 14, "Q8_0": 1}
    [note] = [n for n in result["notes"] if "re-quantized" in n]
    reported = float(re.search(r"RMS change ([0-9.]+)%", note).group(1))
    assert note.startswith("14 quantized layers re-quantized to Q4_K from their dequantized weights")
    # the number is the change between the int4 model's weights and the file's
    _, written, _ = load_gguf_model(out)
    model = quantized_model(64)
    change = total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            w = module.dequantize().double()
            change += ((written[f"{name}.weight"].double() - w) ** 2).sum().item()
            total += (w ** 2).sum().item()
    assert reported == pytest.approx(100 * (change / total) ** 0.5, abs=0.006) and 0 < reported < 20
    # the human summary says the same
    assert main(["export", "--model", str(folder), "--to", "gguf", "--dtype", "q4_k", "-o", str(out)]) == 0
    assert "re-quantized to Q4_K" in capsys.readouterr().out


def test_default_gguf_export_of_a_quantized_folder_is_lossless(folder, tmp_path, capsys):
    out = tmp_path / "own.gguf"
    assert main(["export", "--model", str(folder), "--to", "gguf", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "source" and result["tensor_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}
    blocks = read_gguf_model(out, keep=("int4",)).blocks
    codes, step, offset = blocks["blocks.1.mlp.down_proj.weight"].parts
    layer = quantized_model(64).blocks[1].mlp.down_proj  # groups of 64: pairs of blocks sharing a step
    assert np.array_equal(codes, layer.unpack().numpy())
    assert np.array_equal(step[:, ::2], layer.dm[..., 0].float().numpy())
    assert np.array_equal(step[:, ::2], step[:, 1::2])
    assert np.array_equal(offset[:, ::2], layer.dm[..., 1].float().numpy())
    assert GGUFFile(out).metadata["general.quantization_version"] == 2


def test_block_types_are_gguf_only(folder, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["export", "--model", str(folder), "--to", "hf", "--dtype", "q4_k", "-o", out]) == 2
    assert "q4_k is a GGUF block format" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_a_gguf_exported_again_is_the_same_file_tensor_for_tensor(tmp_path, capsys, dtype):
    from lmforge.model.gguf import export_gguf

    model, tokenizer = tiny_lm(vocab_size=259), byte_tokenizer().gguf_metadata()
    source = export_gguf(tmp_path / "a.gguf", model.config, model.state_dict(), tokenizer, dtype)
    again = tmp_path / "b.gguf"
    assert main(["export", "--model", str(source), "--to", "gguf", "-o", str(again)]) == 0
    assert "with their own integers" in capsys.readouterr().out
    a, b = GGUFFile(source), GGUFFile(again)
    assert list(a.tensors) == list(b.tensors)
    for name, info in a.tensors.items():
        assert info.ggml_type == b.tensors[name].ggml_type, name
        assert np.array_equal(np.asarray(a.raw(name)), np.asarray(b.raw(name))), name
