"""The training race's "same recipe" is the same recipe: decay groups, lrs and losses agree.

benchmarks/bench_train.py races transformers' GPT-2 against lmforge's GPT-2 with the same
weights, data and recipe; these tests build both sides with the benchmark's own recipe
builders on a tiny model.
"""

from __future__ import annotations

import math

import bench_train
import pytest
import torch
from bench_train import (
    HFStep,
    Recipe,
    anchor_param_groups,
    anchor_recipe,
    check_same_recipe,
    decay_by_hf_name,
    hf_gpt2,
    lmforge_recipe,
    lmforge_trainer,
    random_windows,
)

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

pytest.importorskip("transformers")

CONFIG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
RECIPE = Recipe(lr=3e-2, steps=8, warmup=3)


def both_sides(recipe: Recipe = RECIPE):
    torch.manual_seed(0)
    ours = Transformer(CONFIG)
    hf = hf_gpt2(CONFIG, ours.state_dict())
    ours_optimizer, lr_factor = lmforge_recipe(ours, recipe)
    anchor_optimizer, scheduler = anchor_recipe(hf, recipe)
    return ours, ours_optimizer, lr_factor, hf, anchor_optimizer, scheduler


def test_the_two_recipes_decay_the_same_tensors_and_schedule_the_same_lrs():
    ours, ours_optimizer, lr_factor, hf, anchor_optimizer, scheduler = both_sides()
    check_same_recipe(ours, ours_optimizer, lr_factor, anchor_optimizer, scheduler, RECIPE.steps)
    decay = decay_by_hf_name(ours, ours_optimizer)
    # the tied token embedding (also the LM head) and the positions are not decayed on either side
    assert decay["transformer.wte.weight"] == decay["transformer.wpe.weight"] == 0.0
    assert decay["transformer.h.0.attn.c_attn.weight"] == decay["transformer.h.1.mlp.c_fc.weight"] == 0.1
    assert decay["transformer.h.0.ln_1.weight"] == decay["transformer.h.0.attn.c_attn.bias"] == 0.0
    assert set(decay) == {name for name, _ in hf.named_parameters()}
    # step 0 already learns; the peak is reached at the end of warmup; the last step is at 0
    lrs = [RECIPE.lr * lr_factor(step) for step in range(RECIPE.steps)]
    assert lrs[0] == pytest.approx(RECIPE.lr / RECIPE.warmup)
    assert lrs[RECIPE.warmup - 1] == pytest.approx(RECIPE.lr)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_the_check_catches_transformers_trainer_defaults():
    """The race's old anchor: decay on every matrix (the tied embedding included), and
    `get_cosine_schedule_with_warmup`, whose step 0 runs at lr 0."""
    import transformers

    ours, ours_optimizer, lr_factor, hf, _, _ = both_sides()
    groups = [{"name": "decay", "names": [n for n, p in hf.named_parameters() if p.dim() >= 2],
               "params": [p for p in hf.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"name": "no_decay", "names": [n for n, p in hf.named_parameters() if p.dim() < 2],
               "params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    old = torch.optim.AdamW(groups, lr=RECIPE.lr)
    with pytest.raises(AssertionError, match="transformer.wte.weight"):
        check_same_recipe(ours, ours_optimizer, lr_factor, old, None, RECIPE.steps)
    same_groups = torch.optim.AdamW(anchor_param_groups(hf, RECIPE.weight_decay), lr=RECIPE.lr)
    old_schedule = transformers.get_cosine_schedule_with_warmup(same_groups, RECIPE.warmup, RECIPE.steps)
    with pytest.raises(AssertionError, match="lr differs at step 0"):
        check_same_recipe(ours, ours_optimizer, lr_factor, same_groups, old_schedule, RECIPE.steps)


def test_same_weights_data_and_recipe_train_alike(tmp_path):
    """A few real steps of each side: the lrs used agree every step, and so do the losses
    (only the implementations' rounding differs)."""
    ours, ours_optimizer, lr_factor, hf, anchor_optimizer, scheduler = both_sides()
    seq_len, micro_batch = 16, 2
    trainer = lmforge_trainer(ours, ours_optimizer, lr_factor, random_windows(CONFIG.vocab_size, seq_len, 3),
                              micro_batch, seq_len, "fp32", tmp_path, steps=RECIPE.steps)
    anchor = HFStep(hf, anchor_optimizer, random_windows(CONFIG.vocab_size, seq_len, 3), micro_batch, "fp32",
                    scheduler)
    for _ in range(RECIPE.steps):
        record = trainer.train_step()
        theirs = anchor()
        assert record is not None and math.isfinite(record["loss"])
        assert bench_train.same_lrs(bench_train.lrs_by_group(ours_optimizer.param_groups), anchor.last_lrs)
        assert record["loss"] == pytest.approx(theirs, abs=2e-4)
