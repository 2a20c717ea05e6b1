"""The fine-tuning benchmark compares like with like: same tensors train, same lrs, same losses.

benchmarks/bench_finetune.py runs lmforge's fine-tuning against peft + transformers'
`Trainer` on SmolLM2; these tests build both sides with the benchmark's own recipe
builders on a tiny random Llama, so the comparison's fairness is checked without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bench_finetune import (
    SFTRecipe,
    anchor_model,
    anchor_recipe,
    check_same_recipe,
    initial_adapter,
    lmforge_decay,
    lmforge_recipe,
    nf4_absmax_codes,
    run_anchor,
    run_lmforge,
    to_anchor_inputs,
)
from tests.tune.conftest import tiny_llama

from lmforge.model.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.objectives import CausalLMObjective

pytest.importorskip("transformers")
pytest.importorskip("peft")

STEPS = 3  # optimizer steps of the training-loop test
SCHEDULE_STEPS = 6  # steps of the recipe tests: warmup, then the whole cosine


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The tiny Llama as a Hugging Face folder, which both sides load (tests/tune/conftest.py's model)."""
    path = tmp_path_factory.mktemp("bench-finetune") / "base"
    save_checkpoint(path, tiny_llama())
    return path


def packed_batch(seed: int, rows: int = 2, lengths: tuple[int, ...] = (11, 14, 7)) -> Batch:
    """Rows of three examples packed side by side (positions restart), assistant-style labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (rows, sum(lengths)), generator=g)
    labels = torch.randint(0, 96, (rows, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(rows, -1).contiguous()
    start = 0
    for n in lengths:  # a "prompt" without loss, and no label at an example's last position
        labels[:, start:start + 3] = IGNORE_INDEX
        labels[:, start + n - 1] = IGNORE_INDEX
        start += n
    return Batch(ids, labels, positions)


def both_sides(folder: Path, method: str):
    recipe = SFTRecipe.for_method(method, SCHEDULE_STEPS, lr=1e-2)
    base, _ = load_checkpoint(folder)
    init = initial_adapter(load_checkpoint(folder)[0], recipe) if recipe.adapter else None
    scales = nf4_absmax_codes(base) if method == "qlora" else None
    optimizer, lr_factor = lmforge_recipe(base, recipe, init)
    theirs, _ = anchor_model(folder, recipe, init, scales)
    anchor_optimizer, scheduler = anchor_recipe(theirs, recipe)
    return recipe, base, optimizer, lr_factor, theirs, anchor_optimizer, scheduler


METHODS = ["full", "lora", "dora", pytest.param("qlora", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("bitsandbytes"), reason="QLoRA's anchor needs bitsandbytes"))]


@pytest.mark.parametrize("method", METHODS)
def test_same_trainable_tensors_decay_and_lrs(folder, method):
    recipe, ours, optimizer, lr_factor, theirs, anchor_optimizer, scheduler = both_sides(folder, method)
    count = check_same_recipe(ours, optimizer, lr_factor, anchor_optimizer, scheduler, recipe.steps)
    decay = lmforge_decay(ours, optimizer)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    if method == "full":
        assert count == len(list(ours.parameters()))
        assert decay["model.embed_tokens.weight"] == decay["lm_head.weight"] == 0.0  # lmforge's rule
        assert decay["model.layers.0.self_attn.q_proj.weight"] == recipe.weight_decay
        assert decay["model.layers.0.input_layernorm.weight"] == 0.0
    else:
        per_layer = 7 * (3 if method == "dora" else 2)  # q k v o gate up down: A, B (and DoRA's magnitude)
        assert count == per_layer * ours.config.n_layers
        assert decay["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == recipe.weight_decay
        if method == "dora":
            assert decay["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"] == 0.0
    # warmup from lr/warmup on step 0, then the cosine down to min_lr_ratio at the last step
    lrs = [recipe.lr * lr_factor(step) for step in range(recipe.steps)]
    assert lrs[0] == pytest.approx(recipe.lr / recipe.warmup)
    assert lrs[recipe.warmup - 1] == pytest.approx(recipe.lr)
    assert lrs[-1] == pytest.approx(recipe.lr * recipe.min_lr_ratio)


@pytest.mark.parametrize("method", METHODS)
def test_first_step_losses_agree_on_packed_rows(folder, method):
    _, ours, _, _, theirs, _, _ = both_sides(folder, method)
    batch = packed_batch(0)
    with torch.no_grad():
        mine = float(CausalLMObjective().loss(ours, batch)[0])
        anchor = float(theirs(**to_anchor_inputs(batch)).loss)
    assert math.isclose(mine, anchor, rel_tol=1e-4), (mine, anchor)


def test_transformers_keeps_packed_examples_apart_only_without_a_cache(folder):
    """Why the anchor sets `use_cache=False`: with a cache (the config's default) transformers
    skips its packed-sequence detection and the examples attend across their seams."""
    recipe = SFTRecipe.for_method("full", SCHEDULE_STEPS)
    theirs, _ = anchor_model(folder, recipe)
    batch = packed_batch(1)
    ours, _ = load_checkpoint(folder)
    with torch.no_grad():
        apart = float(theirs(**to_anchor_inputs(batch)).loss)
        mixed = float(theirs(**to_anchor_inputs(batch), use_cache=True).loss)
        mine = float(CausalLMObjective().loss(ours, batch)[0])
    assert math.isclose(apart, mine, rel_tol=1e-5)
    assert not math.isclose(mixed, mine, rel_tol=1e-3)


def test_the_check_catches_a_different_recipe(folder):
    """Transformers' own defaults differ: decay on the LM head and embeddings, and a schedule
    whose step 0 has lr 0 (`get_cosine_schedule_with_warmup`)."""
    import transformers

    recipe, ours, optimizer, lr_factor, theirs, _, _ = both_sides(folder, "full")
    every_matrix = torch.optim.AdamW([
        {"name": "decay", "names": [n for n, p in theirs.named_parameters() if p.dim() >= 2],
         "params": [p for p in theirs.parameters() if p.dim() >= 2], "weight_decay": recipe.weight_decay},
        {"name": "no_decay", "names": [n for n, p in theirs.named_parameters() if p.dim() < 2],
         "params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=recipe.lr)
    with pytest.raises(AssertionError, match="lm_head.weight"):
        check_same_recipe(ours, optimizer, lr_factor, every_matrix, None, recipe.steps)
    same_groups, _ = anchor_recipe(theirs, recipe)
    hf_schedule = transformers.get_cosine_schedule_with_warmup(same_groups, recipe.warmup, recipe.steps)
    with pytest.raises(AssertionError, match="lr differs at step 0"):
        check_same_recipe(ours, optimizer, lr_factor, same_groups, hf_schedule, recipe.steps)


def test_the_two_training_loops_give_the_same_losses(folder, tmp_path):
    """lmforge's Trainer and transformers' Trainer, on the same saved batches: the same loss at every
    step (so the same batches in the same order, the same optimizer, clipping and schedule)."""
    recipe = SFTRecipe.for_method("lora", STEPS, lr=1e-2)
    init = initial_adapter(load_checkpoint(folder)[0], recipe)
    batches = {"train": [packed_batch(seed) for seed in range(STEPS)], "val": [packed_batch(99)]}
    ours = run_lmforge(folder, recipe, batches, init, tmp_path / "lmforge")
    theirs = run_anchor(folder, recipe, batches, init, tmp_path / "anchor")
    assert ours["decay"] == theirs["decay"] and ours["lrs"] == theirs["lrs"]
    assert len(ours["losses"]) == len(theirs["losses"]) == len(ours["step_seconds"]) == STEPS
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
    assert ours["losses"][0] != ours["losses"][1]  # different batches, and the weights moved
    assert ours["val_loss_after"] == pytest.approx(theirs["val_loss_after"], rel=1e-5)
    assert ours["val_loss_after"] != pytest.approx(ours["val_loss_before"], rel=1e-6)
