"""Structured pruning removes what contributes least: parts that contribute nothing go first and
leave the model's outputs exactly as they were, and the result is a smaller ordinary model."""

import pytest
import torch
from tests.align.conftest import save_hf_folder

from lmforge.cli import main
from lmforge.compress.structured import StructureError, shrink_model
from lmforge.model.checkpoint import load_checkpoint

from .conftest import engine_matches_forward, tiny_lm

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_dead_mlp_channels_go_first_and_nothing_changes(calibration):
    model = tiny_lm()
    dead = torch.arange(0, 128, 2)  # every other hidden channel feeds nothing into the block's output
    for block in model.blocks:
        block.mlp.down_proj.weight[:, dead] = 0.0
    before = logits(model)
    small, report = shrink_model(model, "channels", 0.5, calibration)
    assert small.config.d_ff == 64 and all(b.mlp.down_proj.in_features == 64 for b in small.blocks)
    assert report.parameters_after < report.parameters_before
    assert torch.allclose(logits(small), before, atol=1e-5)


def test_a_silent_key_value_group_goes_first_with_its_query_heads(calibration):
    model = tiny_lm()  # 4 query heads in 2 key/value groups of 16 dimensions
    for block in model.blocks:
        block.attn.o_proj.weight[:, 32:] = 0.0  # the query heads of group 1 write nothing
    before = logits(model)
    small, report = shrink_model(model, "heads", 0.5, calibration)
    assert (small.config.n_heads, small.config.kv_heads, small.config.dim_per_head) == (2, 1, 16)
    assert "1 of 2 key/value head groups" in report.kept
    assert torch.allclose(logits(small), before, atol=1e-5)


def test_a_block_that_changes_nothing_is_the_one_removed(calibration):
    model = tiny_lm(n_layers=3)
    block = model.blocks[1]
    block.attn.o_proj.weight.zero_()
    block.mlp.down_proj.weight.zero_()  # x + 0 + 0: output == input
    before = logits(model)
    small, report = shrink_model(model, "layers", 0.34, calibration)
    assert small.config.n_layers == 2 and report.kept == "blocks [0, 2]"
    assert torch.allclose(logits(small), before, atol=1e-5)


def test_impossible_structures_are_clear_errors(calibration):
    with pytest.raises(StructureError, match="nothing or everything"):
        shrink_model(tiny_lm(), "layers", 0.1, calibration)
    with pytest.raises(StructureError, match="ALiBi"):
        shrink_model(tiny_lm(position="alibi"), "heads", 0.5, calibration)
    with pytest.raises(StructureError, match="removes nothing"):
        shrink_model(tiny_lm(), "channels", 0.1, calibration)


def test_prune_heads_writes_a_smaller_checkpoint_transformers_runs_the_same(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    save_hf_folder(tiny_lm(), tmp_path / "model")
    (tmp_path / "calib.txt").write_text("Structured pruning keeps what matters. " * 40)
    assert main(["prune", "--model", str(tmp_path / "model"), "--method", "heads", "--sparsity", "0.5",
                 "--calibration", str(tmp_path / "calib.txt"), "--samples", "4", "--seq-len", "32",
                 "-o", str(tmp_path / "small"), "-q"]) == 0
    assert "keeps 1 of 2 key/value head groups" in capsys.readouterr().out
    ours, config = load_checkpoint(tmp_path / "small")
    assert config.n_heads == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, ours(IDS).logits, atol=1e-4)
    assert main(["prune", "--model", str(tmp_path / "model"), "--method", "layers", "--sparsity", "2:4", "-o",
                 str(tmp_path / "x"), "-q"]) == 2
    assert "removes a fraction (0.25), not an n:m pattern" in capsys.readouterr().err


@pytest.mark.parametrize("structure", ["channels", "heads", "layers"])
def test_the_engine_decodes_a_shrunk_model_as_its_forward_pass_computes(structure, calibration):
    small, _ = shrink_model(tiny_lm(), structure, 0.5, calibration)  # heads: 2 query heads x 16 != d_model
    assert engine_matches_forward(small, [5, 80, 13, 200], 10)
