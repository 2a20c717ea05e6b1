"""Every recipe in configs/align parses into a valid AlignConfig whose pieces fit together."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.align.run import ALGORITHMS, AlignConfig, rows_per_step
from lmforge.config import load_config
from lmforge.eval.verifiable import get_task

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "align").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(recipe):
    config = load_config(AlignConfig, recipe)
    assert config.model and config.data.source and config.algorithm in ALGORITHMS
    config.schedule.validate()
    steps = rows_per_step(config.train)
    if config.algorithm in ("grpo", "ppo"):
        rl = config.grpo if config.algorithm == "grpo" else config.ppo
        rl.validate()
        assert rl.rollout.rows % steps == 0, "a rollout buffer must split into whole optimizer steps"
        get_task(config.data.source, **config.data.task_options).problems("test", 2)


def test_recipes_exist():
    expected = {"smollm2-grpo", "smollm2-ppo", "smollm2-dpo-onpolicy", "smollm2-reward"}
    assert {p.stem for p in RECIPES} >= expected
