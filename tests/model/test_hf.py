"""lmforge <-> transformers: every supported family computes the same logits in both directions.

Each case builds a small random `transformers` model locally (nothing is downloaded),
perturbs every weight so that biases and norm gains are not their trivial 0/1 init,
and checks: HF folder -> lmforge, lmforge -> folder -> transformers, and a fresh
lmforge model -> folder -> transformers.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lmforge.model.config import ModelConfig, preset  # noqa: E402
from lmforge.model.hf import (  # noqa: E402
    CheckpointError,
    config_from_hf,
    config_to_hf,
    hf_model_type,
    state_dict_from_hf,
    state_dict_to_hf,
)
from lmforge.model.transformer import Transformer  # noqa: E402

VOCAB, SEQ = 128, 16
LLAMA_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2)

CASES = {
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", **LLAMA_BASE, attention_bias=True, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-tied": dict(model_type="llama", **LLAMA_BASE, mlp_bias=True, tie_word_embeddings=True,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(model_type="qwen2", **LLAMA_BASE, tie_word_embeddings=True),
    "qwen2-sliding": dict(model_type="qwen2", **LLAMA_BASE, use_sliding_window=True, sliding_window=5,
                          max_window_layers=0),
    "mistral": dict(model_type="mistral", **LLAMA_BASE | {"head_dim": 32}, sliding_window=5),
    "mixtral": dict(model_type="mixtral", **LLAMA_BASE, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=6),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (biases off zero, norm gains off one) so every mapping is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _hf_model(case: str):
    values = dict(CASES[case])
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _perturb(model, 1)
    return model.eval()


def _ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_lmforge_to_hf(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ids = _ids()
    expected = _hf_logits(hf, ids)

    model, config = load_checkpoint(tmp_path / "hf")
    assert model.embed.weight.dtype == torch.float32
    assert (_our_logits(model, ids) - expected).abs().max() < 1e-4
    assert config.extra["hf"]["model_type"] == CASES[case]["model_type"]

    save_checkpoint(tmp_path / "ours", model, config)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [type(hf).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (_hf_logits(back, ids) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_lmforge_random_init_loads_in_transformers(case, tmp_path):
    config = config_from_hf({k: v for k, v in CASES[case].items()})
    torch.manual_seed(3)
    model = Transformer(config).eval()
    _perturb(model, 4)
    save_checkpoint(tmp_path / "ours", model, config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = _ids(5)
    assert (_hf_logits(hf, ids) - _our_logits(model, ids)).abs().max() < 1e-4


def test_sliding_window_matters_in_the_comparison():
    """The mistral case would pass trivially if its window were wider than the sequence."""
    hf = _hf_model("mistral")
    config = config_from_hf(CASES["mistral"])
    assert config.sliding_window is not None and config.sliding_window < SEQ
    model = Transformer(config).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    wide = Transformer(ModelConfig.from_dict(config.to_dict() | {"sliding_window": None})).eval()
    wide.load_state_dict(model.state_dict())
    ids = _ids()
    assert (_our_logits(model, ids) - _hf_logits(hf, ids)).abs().max() < 1e-4
    assert (_our_logits(wide, ids) - _our_logits(model, ids)).abs().max() > 1e-3


def test_mixtral_fused_in_memory_layout_both_ways():
    """transformers 5 keeps experts fused in memory (gate_up_proj [E, 2I, d]); files are per expert."""
    hf = _hf_model("mixtral")
    config = config_from_hf(CASES["mixtral"])
    live = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in live
    model = Transformer(config).eval()
    model.load_state_dict(state_dict_from_hf(live, config))
    ids = _ids()
    assert (_our_logits(model, ids) - _hf_logits(hf, ids)).abs().max() < 1e-4

    fused = state_dict_to_hf(model.state_dict(), config, fused_experts=True)
    assert set(fused) == set(live)
    per_expert = state_dict_to_hf(model.state_dict(), config)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in per_expert


def test_gpt2_original_names_without_prefix_and_mask_buffers():
    """The original OpenAI GPT-2 upload has no `transformer.` prefix and stores causal-mask buffers."""
    hf = _hf_model("gpt2")
    config = config_from_hf(CASES["gpt2"])
    legacy = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    model = Transformer(config).eval()
    model.load_state_dict(state_dict_from_hf(legacy, config))
    ids = _ids()
    assert (_our_logits(model, ids) - _hf_logits(hf, ids)).abs().max() < 1e-4


def test_config_round_trip_and_family_choice():
    for case, values in CASES.items():
        config = config_from_hf(values)
        again = config_from_hf(config_to_hf(config))
        assert again.to_dict() | {"extra": {}} == config.to_dict() | {"extra": {}}, case
        assert hf_model_type(config) == values["model_type"], case
    ours = config_from_hf(CASES["llama"])
    written = config_to_hf(ours)
    assert written["bos_token_id"] == 1 and written["eos_token_id"] == 2
    assert written["rope_parameters"]["rope_type"] == "llama3"
    assert written["rope_scaling"]["factor"] == 8.0
    gpt2 = config_to_hf(config_from_hf(CASES["gpt2"]))
    assert gpt2["activation_function"] == "gelu_new" and gpt2["n_positions"] == 64


def test_legacy_rope_fields_and_missing_defaults():
    """transformers 4 wrote rope_theta + rope_scaling {"type": ...}; omitted fields take HF's defaults."""
    legacy = {k: v for k, v in LLAMA_BASE.items() if k != "max_position_embeddings"}
    config = config_from_hf({"model_type": "llama", **legacy, "rope_theta": 1234.0,
                             "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert config.rope_theta == 1234.0 and config.rope_scaling == {"type": "linear", "factor": 4.0}
    assert config.max_seq_len == 2048 and config.norm_eps == 1e-6
    mistral = config_from_hf({"model_type": "mistral", **LLAMA_BASE})
    assert mistral.sliding_window == 4096  # MistralConfig's default window
    no_window = config_from_hf({"model_type": "mistral", **LLAMA_BASE, "sliding_window": None})
    assert no_window.sliding_window is None


UNSUPPORTED = [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4}, "layer_types"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"some_new_field": 3}, "some_new_field"),
]


@pytest.mark.parametrize("change,named", UNSUPPORTED)
def test_unsupported_hf_fields_are_errors_that_name_the_field(change, named):
    with pytest.raises(CheckpointError, match=named):
        config_from_hf({"model_type": "llama", **LLAMA_BASE, **change})


def test_more_unsupported_hf_configs():
    with pytest.raises(CheckpointError, match="unknown architecture"):
        config_from_hf({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    with pytest.raises(CheckpointError, match="LlamaModel"):
        config_from_hf({"model_type": "llama", "architectures": ["LlamaModel"], **LLAMA_BASE})
    with pytest.raises(CheckpointError, match="activation_function"):
        config_from_hf(CASES["gpt2"] | {"activation_function": "relu"})
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf(CASES["gpt2"] | {"scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(CheckpointError, match="max_window_layers"):  # Qwen2: only layer 1 slides
        config_from_hf(CASES["qwen2-sliding"] | {"max_window_layers": 1})
    with pytest.raises(CheckpointError, match="router_jitter_noise"):
        config_from_hf(CASES["mixtral"] | {"router_jitter_noise": 0.1})
    lenient = config_from_hf({"model_type": "llama", **LLAMA_BASE, "some_new_field": 3}, strict=False)
    assert lenient.extra["hf"]["ignored_fields"] == ["some_new_field"]


@pytest.mark.parametrize("change,named", [
    ({"position": "alibi"}, "alibi"),
    ({"mlp": "relu2"}, "relu2"),
    ({"qk_norm": True}, "qk_norm"),
])
def test_lmforge_only_configs_fail_hf_export_but_save_natively(change, named, tmp_path):
    config = ModelConfig.from_dict(config_from_hf(CASES["llama"]).to_dict() | change)
    with pytest.raises(CheckpointError, match=named):
        config_to_hf(config)
    with pytest.raises(CheckpointError, match=named):
        config_to_hf(config, model_type="llama")
    model = Transformer(config).eval()
    save_checkpoint(tmp_path / "native", model, config)
    written = json.loads((tmp_path / "native" / "config.json").read_text())
    assert written["architectures"] == ["LmforgeTransformer"]
    loaded, loaded_config = load_checkpoint(tmp_path / "native")
    assert loaded_config.to_dict() == config.to_dict()
    ids = _ids()
    assert torch.equal(_our_logits(loaded, ids), _our_logits(model, ids))


# config.json files as published on the Hub (copied here, field by field), which must parse in strict mode.
PUBLISHED = {name: json.loads(text) for name, text in {
    "gpt2": """{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
        "summary_use_proj": true, "task_specific_params": {"text-generation": {"do_sample": true}},
        "vocab_size": 50257}""",
    "smollm2-135m": """{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu",
        "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": true, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
        "use_cache": true, "vocab_size": 49152}""",
    "llama-3.1-8b": """{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256}""",
    "qwen2.5-0.5b": """{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
        "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}""",
    "mixtral-8x7b": """{"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": false, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": null, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": true,
        "vocab_size": 32000}""",
}.items()}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_parse_strictly(name):
    config = config_from_hf(PUBLISHED[name])
    assert config.extra["hf"]["model_type"] == PUBLISHED[name]["model_type"]
    assert config_from_hf(config_to_hf(config)).to_dict() | {"extra": {}} == config.to_dict() | {"extra": {}}


def test_published_configs_match_the_presets():
    gpt2 = config_from_hf(PUBLISHED["gpt2"])
    assert gpt2.num_parameters() == 124_439_808
    assert gpt2.to_dict() | {"extra": {}, "dropout": 0.0} == preset("gpt2").to_dict()
    smollm2 = config_from_hf(PUBLISHED["smollm2-135m"])
    assert smollm2.to_dict() | {"extra": {}, "init_std": 0.02} == preset("smollm2-135m").to_dict()
    llama31 = config_from_hf(PUBLISHED["llama-3.1-8b"])
    assert llama31.rope_scaling["original_max_position_embeddings"] == 8192
    assert config_from_hf(PUBLISHED["qwen2.5-0.5b"]).sliding_window is None
    mixtral = config_from_hf(PUBLISHED["mixtral-8x7b"])
    assert (mixtral.n_experts, mixtral.n_experts_per_token, mixtral.moe_aux_loss_coef) == (8, 2, 0.02)
