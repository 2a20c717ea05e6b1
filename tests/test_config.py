from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.config import ConfigKeyError, build, load_config, parse_overrides


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    kind: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Recipe:
    name: str = "run"
    steps: int = 10
    window: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: tiny\nsteps: 100\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Recipe, path, ["optim.kind=sgd", "--steps", "5", "--window=64"])
    assert cfg == Recipe(name="tiny", steps=5, window=64, optim=Optim(lr=3e-4, kind="sgd"))
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_names_the_dotted_path(tmp_path):
    with pytest.raises(ConfigKeyError, match="optim.lrr"):
        load_config(Recipe, None, ["optim.lrr=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [("steps=ten", "steps must be int"), ("optim.kind=adam", "optim.kind must be one of"),
     ("steps=true", "steps must be int"), ("optim.betas=3", "optim.betas must be a list")],
)
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigKeyError, match=message):
        load_config(Recipe, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigKeyError, match="does not exist"):
        load_config(Recipe, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigKeyError, match="not valid YAML"):
        load_config(Recipe, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigKeyError, match="mapping"):
        load_config(Recipe, listy)


def test_override_syntax_errors():
    with pytest.raises(ConfigKeyError, match="has no value"):
        parse_overrides(["--steps"])
    with pytest.raises(ConfigKeyError, match="key.path=value"):
        parse_overrides(["steps"])


def test_build_rejects_non_mapping_section():
    with pytest.raises(ConfigKeyError, match="optim must be a mapping"):
        build(Recipe, {"optim": 3})


def test_a_partial_override_keeps_the_rest_of_a_sections_own_default():
    """A recipe class whose `optim` defaults to lr 5e-6 keeps it when only weight_decay is given."""
    from lmforge.align.run import AlignConfig

    default = AlignConfig(model="m", algorithm="dpo")
    config = build(AlignConfig, {"model": "m", "algorithm": "dpo", "optim": {"weight_decay": 0.1},
                                 "train": {"steps": 5}})
    assert config.optim.weight_decay == 0.1 and config.optim.lr == default.optim.lr == 5e-6
    assert config.train.steps == 5 and config.train.batch_tokens == default.train.batch_tokens
    assert config.lora == default.lora  # untouched sections stay as they were
