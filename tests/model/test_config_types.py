"""`ModelConfig` refuses values of the wrong type itself, whatever file or code built it."""

import pytest

from lmforge.model.config import ConfigError, ModelConfig


@pytest.mark.parametrize("field, value, message", [
    ("d_model", True, "d_model must be a positive integer"),
    ("n_kv_heads", 0, "n_kv_heads must be a positive integer or unset"),
    ("norm_eps", -1e-5, "norm_eps must be a positive finite number"),
    ("rope_theta", float("nan"), "rope_theta must be a positive finite number"),
    ("qkv_bias", "yes", "qkv_bias must be true or false"),
    ("rope_scaling", ["linear", 2.0], "rope_scaling must be a mapping"),
    ("dropout", 1.5, "dropout must be in"),
])
def test_wrong_types_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{field: value})
