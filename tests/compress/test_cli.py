"""`lmforge quantize` and `lmforge prune` end to end on a tiny checkpoint, as a user runs them."""

import json

import pytest
import torch
from tests.align.conftest import save_hf_folder

from lmforge.cli import main
from lmforge.infer.quant import Int4Linear

from .conftest import tiny_lm

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def workspace(tmp_path):
    save_hf_folder(tiny_lm(), tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "heldout.txt").write_text("Pack my box with five dozen liquor jugs. " * 40)
    return tmp_path


def test_quantize_writes_a_folder_that_generate_runs_and_reports_as_json(workspace, capsys):
    out = workspace / "q"
    assert main(["quantize", "--model", str(workspace / "model"), "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--calibration", str(workspace / "calib.txt"), "--samples", "4",
                 "--seq-len", "32", "--measure", "--heldout", str(workspace / "heldout.txt"), "-o", str(out),
                 "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "gptq" and summary["layers"] == 14 and summary["calibration_tokens"] == 128
    assert summary["act_order"] is True  # gptq's default
    assert summary["bytes_after"] < summary["bytes_before"] / 2
    assert summary["heldout_before"]["tokens"] == summary["heldout_after"]["tokens"] > 0
    recorded = json.loads((out / "lmforge.json").read_text())["compression"]
    assert recorded["method"] == "gptq" and len(recorded["details"]["loss"]) == 14
    assert main(["generate", "--model", str(out), "--prompt", "The quick", "--max-new-tokens", "4",
                 "-q"]) == 0


def test_smoothquant_writes_a_w8a8_folder_that_generate_runs(workspace, capsys):
    out = workspace / "w8a8"
    assert main(["quantize", "--model", str(workspace / "model"), "--method", "smoothquant", "--bits", "8",
                 "--activations", "static", "--alpha", "0.5", "--calibration", str(workspace / "calib.txt"),
                 "--samples", "4", "--seq-len", "32", "-o", str(out), "--quiet"]) == 0
    assert "W8A8 (int8 weights per channel, int8 activations with static scales)" in capsys.readouterr().out
    layers = json.loads((out / "lmforge.json").read_text())["quantized_layers"]
    assert layers["blocks.0.mlp.down_proj"] == {"format": "int8", "activations": "static"}
    assert layers["lm_head"] == {"format": "int8"}  # the head keeps float activations
    assert main(["generate", "--model", str(out), "--prompt", "The quick", "--max-new-tokens", "4",
                 "-q"]) == 0


def test_prune_writes_a_float_checkpoint_transformers_loads_with_the_zeros(workspace, capsys):
    transformers = pytest.importorskip("transformers")
    out = workspace / "p"
    assert main(["prune", "--model", str(workspace / "model"), "--method", "wanda", "--sparsity", "2:4",
                 "--calibration", str(workspace / "calib.txt"), "--samples", "4", "--seq-len", "32",
                 "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wanda: 14 linear layers pruned to 2:4" in printed and "50.0%" in printed
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    down = hf.model.layers[0].mlp.down_proj.weight
    assert ((down.view(down.shape[0], -1, 4) == 0).sum(-1) == 2).all()


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--method", "rtn", "--bits", "4", "--group-size", "96"], "cannot be cut into groups of 96"),
    (["prune", "--method", "magnitude", "--sparsity", "0.5", "--calibration", "x.txt"],
     "uses no calibration"),
    (["prune", "--method", "wanda", "--sparsity", "3:2"], "0 < n < m"),
    (["quantize", "--method", "awq", "--bits", "4", "--group-size", "32", "--act-order"], "GPTQ option"),
    (["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--damp", "0"], "--damp must be"),
    (["quantize", "--method", "rtn", "--bits", "8", "--calibration", "x.txt"], "uses no calibration"),
    (["prune", "--method", "wanda", "--sparsity", "0.5", "--seq-len", "1"], "at least 2 tokens"),
    (["quantize", "--method", "smoothquant", "--bits", "4"], "use --bits 8"),
    (["quantize", "--method", "rtn", "--bits", "8", "--alpha", "0.5"], "smoothquant options"),
])
def test_bad_settings_are_one_line_errors(workspace, capsys, argv, message):
    assert main([*argv, "--model", str(workspace / "model"), "-o", str(workspace / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workspace / "out").exists()


def test_the_output_never_replaces_the_model_or_a_folder_of_other_files(workspace, capsys):
    (workspace / "mine").mkdir()
    (workspace / "mine" / "notes.txt").write_text("keep me")
    for target in (workspace / "mine", workspace / "model"):
        assert main(["quantize", "--model", str(workspace / "model"), "--method", "rtn", "--bits", "8",
                     "-o", str(target), "-q"]) == 2
    err = capsys.readouterr().err
    assert "something other than a model" in err and "is the model being compressed" in err
    assert (workspace / "mine" / "notes.txt").read_text() == "keep me"


def test_an_already_quantized_model_is_refused(workspace, capsys):
    out = workspace / "q"
    assert main(["quantize", "--model", str(workspace / "model"), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "-o", str(out), "-q"]) == 0
    from lmforge.infer.loading import load_model

    assert isinstance(load_model(out).model.blocks[0].attn.q_proj, Int4Linear)
    assert main(["quantize", "--model", str(out), "--method", "rtn", "--bits", "8", "-o",
                 str(workspace / "again"), "-q"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_export_to_hf_writes_the_rounded_weights_transformers_runs_the_same(workspace):
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.loading import load_model

    out = workspace / "q"
    assert main(["quantize", "--model", str(workspace / "model"), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "-o", str(out), "-q"]) == 0
    assert main(["export", "--model", str(out), "--to", "hf", "-o", str(workspace / "hf")]) == 0
    quantized = load_model(out).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(workspace / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, quantized(ids).logits, atol=1e-4)
