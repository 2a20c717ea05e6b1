"""Quantization-aware training: the estimator's gradients, exactness at both ends, and that it learns."""

import copy
import json

import pytest
import torch
from tests.align.conftest import save_hf_folder

from lmforge.cli import main
from lmforge.compress.grid import Grid
from lmforge.compress.layerwise import linear_layers
from lmforge.compress.qat import (
    FakeQuantLinear,
    QATConfig,
    add_fake_quant,
    fake_quantize,
    qat_quantize,
    to_engine,
    train_fake_quantized,
)
from lmforge.compress.quantize import quantize_model
from lmforge.eval.perplexity import perplexity
from lmforge.infer.quant import Int4Linear, Int8Linear
from lmforge.infer.quantized_folder import load_quantized
from lmforge.model.transformer import Transformer

from .conftest import engine_matches_forward, tiny_lm

GRIDS = [Grid(8), Grid(4, 32), Grid(3, 64)]


def fake_quantized(model: Transformer, grid: Grid, learn_ranges: bool) -> Transformer:
    """`model` rounded by RTN and thawed into fake-quant layers over its own float weights."""
    masters = {f"blocks.{i}.{n}": layer.weight for i, block in enumerate(model.blocks)
               for n, layer in linear_layers(block).items()}
    quantize_model(model, "rtn", grid)
    add_fake_quant(model, grid, masters=masters, learn_ranges=learn_ranges)
    return model


def test_straight_through_gradient_is_the_identity_inside_the_range_and_zero_where_clipped():
    grid = Grid(4, 32)
    step, offset = torch.tensor([[[0.1]]]), torch.tensor([[[-0.5]]])  # range -0.5 .. 1.0
    w = torch.linspace(-0.9, 1.4, 32).view(1, 1, 32).requires_grad_(True)
    step.requires_grad_(True)
    offset.requires_grad_(True)
    upstream = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0))
    fake_quantize(w, step, offset, grid).backward(upstream)
    v = (w.detach() - offset.detach()) / step.detach()
    inside = (v >= 0) & (v <= grid.levels)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(w.grad[inside], upstream[inside])  # (upstream * s) / s
    assert torch.equal(w.grad[~inside], torch.zeros_like(w.grad[~inside]))
    # LSQ+: dw_q/ds = round(v) - v inside, the clamp bound outside; dw_q/dm = 0 inside, 1 outside
    q = torch.round(v.clamp(0, grid.levels))
    expected_step = (upstream * torch.where(inside, q - v, q)).sum()
    expected_offset = (upstream * (~inside).float()).sum()
    torch.testing.assert_close(step.grad.sum(), expected_step)
    torch.testing.assert_close(offset.grad.sum(), expected_offset)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("learn_ranges", [True, False])
def test_at_init_the_fake_quantized_model_is_the_rtn_model(grid, learn_ranges):
    rtn = tiny_lm()
    quantize_model(rtn, "rtn", grid)
    fake = fake_quantized(tiny_lm(), grid, learn_ranges)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fake(ids).logits, rtn(ids).logits)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_conversion_gives_the_grids_codes_and_the_same_logits(grid):
    model = fake_quantized(tiny_lm(), grid, learn_ranges=False)
    with torch.no_grad():  # as if trained: every master weight moved
        for layer in model.modules():
            if isinstance(layer, FakeQuantLinear):
                layer.weight.add_(0.02 * torch.randn_like(layer.weight))
    trained = {name: layer.weight.detach().clone() for name, layer in model.named_modules()
               if isinstance(layer, FakeQuantLinear)}
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
    assert to_engine(model) == 14
    with torch.no_grad():  # 80 rows: the dequantizing path, which computes the forward's exact numbers
        assert torch.equal(model(ids).logits, before)
    for name, weight in trained.items():  # re-fitted ranges: exactly round-to-nearest of the trained weights
        layer = model.get_submodule(name)
        codes, step, offset = grid.rtn(weight)
        if grid.symmetric:
            assert isinstance(layer, Int8Linear)
            assert torch.equal(layer.qweight, codes.to(torch.int8))
            assert torch.equal(layer.scale, step.view(-1))
        else:
            assert isinstance(layer, Int4Linear) and layer.group_size == grid.group_size
            assert torch.equal(layer.unpack(), codes.to(torch.uint8))
            assert torch.equal(layer.dm, torch.stack([step, offset], -1).half())
    assert engine_matches_forward(model, [5, 9, 2], 6)


def test_learned_ranges_convert_exactly_too():
    grid = Grid(3, 32)
    model = fake_quantized(tiny_lm(), grid, learn_ranges=True)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, FakeQuantLinear):  # shrink some ranges: weights clip, codes move
                layer.step.mul_(torch.empty_like(layer.step).uniform_(0.7, 1.1))
                layer.offset.add_(0.3 * layer.step)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
        to_engine(model)
        assert torch.equal(model(ids).logits, before)


@pytest.fixture(scope="module")
def sampled_text():
    """A tiny random Llama with sharp outputs (final norm x6), and 32 x 48 tokens sampled from it: data its
    float weights fit best, so rounding's loss on it is all that training can win back."""
    model = tiny_lm()
    with torch.no_grad():
        model.final_norm.weight.mul_(6.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (32, 1), generator=g)
    with torch.no_grad():
        for _ in range(47):
            probs = torch.softmax(model(ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return model, ids


def test_training_through_the_rounding_beats_rounding_after_the_same_training(sampled_text):
    model, windows = sampled_text
    tokens = windows.reshape(-1).numpy()
    grid = Grid(2, 32)
    config = QATConfig(steps=15, lr=1e-3, range_lr=1e-3, batch=8, micro_batch=8, seq_len=47, warmup_steps=2)
    rtn = copy.deepcopy(model)
    quantize_model(rtn, "rtn", grid)
    twin = copy.deepcopy(model)  # the same training without the rounding, rounded afterwards
    train_fake_quantized(twin, tokens, config, quiet=True)
    quantize_model(twin, "rtn", grid)
    qat = copy.deepcopy(model)
    report = qat_quantize(qat, grid, tokens, config, quiet=True)
    assert report.layers == 14 and report.steps == 15 and report.train_tokens == 15 * 8 * 47
    assert all(not isinstance(m, FakeQuantLinear) for m in qat.modules())
    fp32_ppl, rtn_ppl, twin_ppl, qat_ppl = (perplexity(m, windows).perplexity
                                            for m in (model, rtn, twin, qat))
    assert rtn_ppl > 3 * fp32_ppl  # 2 bits hurt this model badly
    assert qat_ppl < 0.6 * rtn_ppl and qat_ppl < 0.7 * twin_ppl


@pytest.fixture
def workspace(tmp_path):
    save_hf_folder(tiny_lm(), tmp_path / "model")
    (tmp_path / "train.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "heldout.txt").write_text("Pack my box with five dozen liquor jugs. " * 40)
    return tmp_path


def test_cli_writes_a_folder_that_loads_into_the_engines_layers(workspace, capsys):
    out = workspace / "q"
    assert main(["quantize", "--model", str(workspace / "model"), "--method", "qat", "--bits", "4",
                 "--group-size", "32", "--data", str(workspace / "train.txt"), "--steps", "3", "--batch", "2",
                 "--seq-len", "32", "--lr", "1e-4", "--measure", "--heldout", str(workspace / "heldout.txt"),
                 "-o", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "qat" and summary["layers"] == 14
    assert summary["qat"]["init"] == "rtn" and summary["qat"]["steps"] == 3
    assert summary["qat"]["train_tokens"] == 3 * 2 * 32
    assert summary["bytes_after"] < summary["bytes_before"] / 2
    assert summary["heldout_after"]["tokens"] > 0
    model = load_quantized(out)
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, Int8Linear)
    assert main(["generate", "--model", str(out), "--prompt", "The quick", "--max-new-tokens", "4",
                 "-q"]) == 0


def test_cli_summary_says_what_qat_did(workspace, capsys):
    assert main(["quantize", "--model", str(workspace / "model"), "--method", "qat", "--bits", "8",
                 "--data", str(workspace / "train.txt"), "--steps", "2", "--batch", "1", "--seq-len", "32",
                 "--ranges", "refit", "-o", str(workspace / "q8"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "qat: 14 linear layers to 8-bit, per channel" in printed
    assert "trained through the rounding from rtn's grid for 2 steps on 64 tokens" in printed
    assert "size:" in printed


@pytest.mark.parametrize("argv, message", [
    (["--method", "rtn", "--bits", "4", "--group-size", "32", "--steps", "5"], "options of --method qat"),
    (["--method", "qat", "--bits", "4", "--group-size", "32", "--steps", "0"], "--steps must be at least 1"),
    (["--method", "qat", "--bits", "4", "--group-size", "32", "--calibration", "x.txt"],
     "qat trains on --data"),
    (["--method", "qat", "--bits", "4", "--group-size", "32", "--seq-len", "4096"],
     "exceeds the model's context"),
    (["--method", "qat", "--bits", "4", "--group-size", "32", "--seq-len", "64", "--data", "short.txt"],
     "fewer than one window"),
])
def test_bad_qat_settings_are_one_line_errors(workspace, capsys, argv, message):
    (workspace / "short.txt").write_text("Too short.")
    argv = [str(workspace / a) if a.endswith(".txt") else a for a in argv]
    argv = [*argv, "--data", str(workspace / "train.txt")] if "--data" not in argv else argv
    assert main(["quantize", *argv, "--model", str(workspace / "model"), "-o", str(workspace / "out"),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workspace / "out").exists()
