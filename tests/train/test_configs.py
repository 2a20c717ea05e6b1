"""Every recipe in configs/pretrain parses into a valid PretrainConfig and model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.train.pretrain import PretrainConfig, model_config

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(recipe):
    config = load_config(PretrainConfig, recipe)
    model = model_config(config.model)
    assert config.train.seq_len <= model.max_seq_len
    assert config.train.accumulation() >= 1
    config.schedule.validate()


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"tiny-cpu", "gpt2-small", "llama-style"}


def test_tiny_cpu_is_small():
    model = model_config(load_config(PretrainConfig, Path(RECIPES[0]).parent / "tiny-cpu.yaml").model)
    assert 1e6 < model.num_parameters() < 5e6
