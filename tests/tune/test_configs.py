"""Every recipe in configs/finetune parses into a valid FinetuneConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.tune.finetune import FinetuneConfig

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(recipe):
    config = load_config(FinetuneConfig, recipe)
    assert config.model and config.data.source and config.method in ("full", "lora", "qlora")
    assert config.train.accumulation() >= 1
    config.schedule.validate()
    config.lora.validate()


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"smollm2-lora", "smollm2-qlora", "smollm2-full"}
