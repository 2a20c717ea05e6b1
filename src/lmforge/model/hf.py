"""Hugging Face checkpoints <-> lmforge: `config.json` fields and state-dict names.

Five `transformers` families map onto one `ModelConfig`: GPT-2 (learned positions,
LayerNorm, GELU, Conv1D weights stored [in, out] with q, k, v fused in `c_attn`) and the
Llama family, Llama, Qwen2, Mistral and Mixtral (RoPE in the same rotate-half layout
as lmforge, so their q/k weights map one to one). The converter is strict in both
directions: an HF field whose value lmforge cannot reproduce (partial rotary, YaRN,
softcapping, an unknown field) is a `CheckpointError` naming it, because a silently
dropped field makes a model that loads and then computes something else. Likewise an
lmforge config that no HF family can express (ALiBi, ReLU², QK-norm) fails on export.

Dropout is the one exception to "exact": it is a training setting, not part of the
function the weights compute, so it maps to the nearest field each family has.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from lmforge.model.config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint or HF config that lmforge cannot read or write faithfully; the message says why."""


ARCHITECTURES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
MODEL_TYPES: dict[str, str] = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
LLAMA_FAMILY = ("llama", "qwen2", "mistral", "mixtral")

# Fields every PretrainedConfig may carry that do not change what the weights compute:
# bookkeeping, label maps, token ids and (in old configs) generation defaults.
_HARMLESS_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "id2label", "label2id", "num_labels",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "is_decoder", "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "tf_legacy_loss", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "transformers.js_config", "is_llama_config",
})
# Fields whose only acceptable value is the one lmforge computes; anything else is an error.
_MUST_EQUAL: dict[str, Any] = {
    "add_cross_attention": False, "rope_interleaved": False, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "quantization_config": None, "pruned_heads": {},
}


_KINDS: dict[str, tuple[Any, str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
               "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _fail(model_type: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(
        f"{model_type} config field {field}={value!r} cannot be expressed in lmforge: {why}")


class _Fields:
    """Reads an HF config dict and remembers which fields were consumed, so leftovers can be reported."""

    def __init__(self, values: Mapping[str, Any], model_type: str) -> None:
        self.values, self.model_type, self.used = dict(values), model_type, set()

    def get(self, key: str, default: Any = ..., kind: str | None = None) -> Any:
        """The field's value (an explicit null stays None); `default` when absent; `...` means required.

        `kind` ("int", "number", "bool", "dict", "list") checks the type of a non-null value:
        config.json is input, and `"hidden_size": true` or `"rms_norm_eps": [1]` must fail
        here, naming the field, not as a TypeError deep inside the model.
        """
        self.used.add(key)
        value = self.values.get(key, default)
        if value is ... or (value is None and default is ...):
            raise CheckpointError(f"{self.model_type} config.json lacks the required field {key!r}")
        if kind is not None and value is not None and not _KINDS[kind][0](value):
            raise _fail(self.model_type, key, value, f"it must be {_KINDS[kind][1]}")
        return value

    def expect(self, key: str, allowed: tuple[Any, ...], default: Any, why: str) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise _fail(self.model_type, key, value, why)
        return value

    def check_leftovers(self, strict: bool) -> list[str]:
        for key, ok in _MUST_EQUAL.items():
            self.used.add(key)
            value = self.values.get(key)
            if value is not None and value != ok:
                raise _fail(self.model_type, key, value, f"lmforge only supports {ok!r}")
        unknown = sorted(k for k in self.values
                         if k not in self.used and k not in _HARMLESS_FIELDS and not k.startswith("_"))
        if unknown and strict:
            listed = ", ".join(f"{k}={self.values[k]!r}" for k in unknown)
            raise CheckpointError(f"{self.model_type} config.json has field(s) lmforge does not know how to "
                                  f"express: {listed} (pass strict=False to ignore them)")
        return unknown


# ---------------------------------------------------------------------------------- config: HF -> lmforge
def hf_model_type_of(hf_config: Mapping[str, Any]) -> str:
    """The family of an HF config.json, from `model_type` or else `architectures`."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json: architectures must be a list of class names, got {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"config.json: model_type must be a string, got {model_type!r}")
    if model_type is None and archs:
        model_type = MODEL_TYPES.get(archs[0])
    if model_type not in ARCHITECTURES:
        known = ", ".join(f"{a} ({t})" for t, a in ARCHITECTURES.items())
        raise CheckpointError(f"unknown architecture {archs or None} / model_type {model_type!r}; "
                              f"lmforge reads {known}")
    for arch in archs:
        if arch != ARCHITECTURES[model_type]:
            raise CheckpointError(f"unsupported architecture {arch!r} for model_type {model_type!r}; "
                                  f"lmforge reads {ARCHITECTURES[model_type]} (a causal LM with its head)")
    return model_type


def config_from_hf(hf_config: Mapping[str, Any], *, strict: bool = True) -> ModelConfig:
    """An HF config.json (as a dict) -> `ModelConfig`; token ids and the family go to `extra["hf"]`.

    `strict=False` ignores fields lmforge does not recognise (known-inexpressible values
    still fail); ignored names are recorded in `extra["hf"]["ignored_fields"]`.
    """
    model_type = hf_model_type_of(hf_config)
    fields = _Fields(hf_config, model_type)
    values = _gpt2_values(fields) if model_type == "gpt2" else _llama_family_values(fields, model_type)
    ignored = fields.check_leftovers(strict)
    hf_meta = {"model_type": model_type}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf_config.get(key)
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(_KINDS["int"][0](i) and i >= 0 for i in ids):
                raise _fail(model_type, key, value, "it must be a token id or a list of them")
            hf_meta[key] = value
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if dtype is not None:
        if not isinstance(dtype, str):
            raise _fail(model_type, "dtype", dtype, "it must be a dtype name such as 'bfloat16'")
        hf_meta["dtype"] = dtype
    if ignored:
        hf_meta["ignored_fields"] = ignored
    try:
        return ModelConfig(**values, extra={"hf": hf_meta})
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{model_type} config.json does not describe a valid model: {err}") from err


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_values(f: _Fields) -> dict[str, Any]:
    d_model = f.get("n_embd", kind="int")
    act = f.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise _fail("gpt2", "activation_function", act, f"supported: {', '.join(_GPT2_ACTIVATIONS)}")
    f.expect("scale_attn_weights", (True,), True, "lmforge always scales scores by 1/sqrt(head_dim)")
    f.expect("scale_attn_by_inverse_layer_idx", (False,), False, "lmforge has no per-layer score scaling")
    f.get("reorder_and_upcast_attn", False)  # a numerics choice (fp32 scores), not a different function
    for key in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                "summary_first_dropout"):  # only GPT2DoubleHeadsModel reads these
        f.get(key, None)
    pdrops = {key: f.get(key, 0.1, "number") for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(pdrops.values())) > 1:
        raise _fail("gpt2", "resid_pdrop/embd_pdrop/attn_pdrop", pdrops, "lmforge has one dropout rate")
    n_ctx = f.get("n_ctx", None, "int")  # the old name of n_positions
    max_seq_len = f.get("n_positions", None, "int") or n_ctx
    if max_seq_len is None:
        raise CheckpointError("gpt2 config.json lacks the required field 'n_positions'")
    return dict(
        vocab_size=f.get("vocab_size", kind="int"), d_model=d_model, n_layers=f.get("n_layer", kind="int"),
        n_heads=f.get("n_head", kind="int"), d_ff=f.get("n_inner", None, "int") or 4 * d_model,
        max_seq_len=max_seq_len, position="learned", norm="layernorm",
        norm_eps=float(f.get("layer_norm_epsilon", 1e-5, "number")), mlp=_GPT2_ACTIVATIONS[act],
        qkv_bias=True, out_bias=True, mlp_bias=True, norm_bias=True,
        tie_embeddings=bool(f.get("tie_word_embeddings", True, "bool")),
        dropout=float(pdrops["resid_pdrop"]), init_std=float(f.get("initializer_range", 0.02, "number")),
    )


# What transformers assumes when a Llama-family config.json omits a field.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "num_key_value_heads": 8, "sliding_window": 4096},
    "mixtral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "num_key_value_heads": 8, "sliding_window": None},
}


def _llama_family_values(f: _Fields, model_type: str) -> dict[str, Any]:
    defaults = _FAMILY_DEFAULTS[model_type]
    d_model, n_heads = f.get("hidden_size", kind="int"), f.get("num_attention_heads", kind="int")
    head_dim = f.get("head_dim", None, "int")
    if head_dim is not None and n_heads * head_dim == d_model:
        head_dim = None  # the default; keeps configs comparable
    f.expect("hidden_act", ("silu", "swish"), "silu", "lmforge's SwiGLU uses silu")
    f.get("pretraining_tp", 1)  # tensor-parallel slicing of the same matmuls: same function
    max_seq_len = f.get("max_position_embeddings", defaults["max_position_embeddings"], "int")
    rope_theta, rope_scaling = _rope_from_hf(f, max_seq_len, defaults["rope_theta"])
    n_kv_heads = f.get("num_key_value_heads", defaults.get("num_key_value_heads"), "int") or n_heads
    values: dict[str, Any] = dict(
        vocab_size=f.get("vocab_size", kind="int"), d_model=d_model,
        n_layers=f.get("num_hidden_layers", kind="int"), n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, d_ff=f.get("intermediate_size", kind="int"), max_seq_len=max_seq_len,
        position="rope", rope_theta=rope_theta, rope_scaling=rope_scaling, norm="rmsnorm",
        norm_eps=float(f.get("rms_norm_eps", defaults["rms_norm_eps"], "number")), mlp="swiglu",
        qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False,
        tie_embeddings=bool(f.get("tie_word_embeddings", False, "bool")),
        dropout=float(f.get("attention_dropout", 0.0, "number") or 0.0),
        init_std=float(f.get("initializer_range", 0.02, "number")),
    )
    if values["n_kv_heads"] == n_heads:
        values["n_kv_heads"] = None
    if model_type == "llama":
        values["qkv_bias"] = values["out_bias"] = bool(f.get("attention_bias", False, "bool"))
        values["mlp_bias"] = bool(f.get("mlp_bias", False, "bool"))
        values["sliding_window"] = _uniform_window(f, None)
    elif model_type == "qwen2":
        values["qkv_bias"] = True  # Qwen2 always has q/k/v biases and never an o_proj bias
        window, first_sliding = f.get("sliding_window", 4096, "int"), f.get("max_window_layers", 28, "int")
        window = window if f.get("use_sliding_window", False, "bool") else None  # as Qwen2Config does
        layer_windows = [window if window is not None and i >= first_sliding else None
                         for i in range(values["n_layers"])]
        values["sliding_window"] = _uniform_window(f, window, layer_windows)
    else:  # mistral, mixtral
        window = f.get("sliding_window", defaults["sliding_window"], "int")
        values["sliding_window"] = _uniform_window(f, window)
    if model_type == "mixtral":
        values["n_experts"] = f.get("num_local_experts", 8, "int")
        values["n_experts_per_token"] = f.get("num_experts_per_tok", 2, "int")
        values["moe_aux_loss_coef"] = float(f.get("router_aux_loss_coef", 0.001, "number"))
        f.expect("router_jitter_noise", (0, 0.0, None), 0.0, "lmforge's router adds no noise")
        f.get("output_router_logits", False)
    return values


def _uniform_window(
    f: _Fields, window: int | None, layer_windows: list[int | None] | None = None,
) -> int | None:
    """lmforge has one sliding window for every layer; HF's `layer_types` may mix full and sliding layers."""
    layer_types = f.get("layer_types", None, "list")
    if layer_types is not None:
        kinds = {kind if isinstance(kind, str) else repr(kind) for kind in layer_types}
        if not kinds <= {"full_attention", "sliding_attention"} or len(kinds) > 1:
            raise _fail(f.model_type, "layer_types", layer_types,
                        "lmforge uses the same attention (all full or all sliding) in every layer")
        if kinds == {"full_attention"}:
            return None
        if window is None:
            raise _fail(f.model_type, "layer_types", layer_types, "sliding layers need a sliding_window")
        return window
    if layer_windows is not None and len(set(layer_windows)) > 1:
        raise _fail(f.model_type, "max_window_layers", f.values.get("max_window_layers"),
                    "only some layers would use the sliding window; lmforge applies it to all or none")
    return layer_windows[0] if layer_windows else window


_ROPE_KEYS = {"default": set(), "linear": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def _rope_from_hf(f: _Fields, max_seq_len: int, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """Reads `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older configs)."""
    top_theta = f.get("rope_theta", None, "number")
    partial = f.get("partial_rotary_factor", None, "number")
    candidates = [(key, f.get(key, None, "dict")) for key in ("rope_parameters", "rope_scaling")]
    parsed = [(key, _parse_rope(f.model_type, key, dict(v), max_seq_len)) for key, v in candidates if v]
    if len(parsed) == 2 and parsed[0][1][1] != parsed[1][1][1]:
        raise _fail(f.model_type, "rope_scaling", candidates[1][1],
                    f"disagrees with rope_parameters={candidates[0][1]}")
    theta, scaling, partial_inner = None, None, None
    if parsed:
        theta, scaling, partial_inner = parsed[0][1]
    for value in (partial, partial_inner):
        if value is not None and float(value) != 1.0:
            raise _fail(f.model_type, "partial_rotary_factor", value,
                        "lmforge rotates every channel of a head")
    if theta is None:
        theta = top_theta if top_theta is not None else default_theta
    return float(theta), scaling


def _parse_rope(model_type: str, field: str, params: dict[str, Any], max_seq_len: int) -> tuple[Any, ...]:
    """One rope dict -> (theta or None, lmforge rope_scaling or None, partial_rotary_factor or None)."""
    for key, value in params.items():
        if key not in ("rope_type", "type") and not _KINDS["number"][0](value):
            raise _fail(model_type, f"{field}.{key}", value, "it must be a finite number")
    theta = params.pop("rope_theta", None)
    partial = params.pop("partial_rotary_factor", None)
    kind = params.pop("rope_type", None) or params.pop("type", "default")
    params.pop("type", None)
    if not isinstance(kind, str) or kind not in _ROPE_KEYS:
        raise _fail(model_type, f"{field}.rope_type", kind, f"supported: {', '.join(_ROPE_KEYS)}")
    extra = sorted(set(params) - _ROPE_KEYS[kind])
    if extra:
        raise _fail(model_type, f"{field}.{extra[0]}", params[extra[0]],
                    f"lmforge's {kind} RoPE has no such parameter")
    if kind == "default":
        return theta, None, partial
    if "factor" not in params:
        raise _fail(model_type, field, params, f"{kind} RoPE scaling needs a factor")
    scaling: dict[str, Any] = {"type": kind, "factor": float(params["factor"])}
    if kind == "llama3":
        scaling |= {"low_freq_factor": float(params.get("low_freq_factor", 1.0)),
                    "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
                    "original_max_position_embeddings":
                        int(params.get("original_max_position_embeddings", max_seq_len))}
    return theta, scaling, partial


# ---------------------------------------------------------------------------------- config: lmforge -> HF
def _reasons_against(config: ModelConfig, model_type: str) -> list[str]:
    """Why `config` cannot be written as `model_type` (empty: it can)."""
    c, why = config, []
    if c.qk_norm:
        why.append("qk_norm=True")
    if model_type == "gpt2":
        checks = [(c.position == "learned", f"position={c.position!r} (gpt2 has learned positions)"),
                  (c.norm == "layernorm" and c.norm_bias, "gpt2 needs LayerNorm with a bias"),
                  (c.mlp in ("gelu", "gelu_tanh"), f"mlp={c.mlp!r} (gpt2 uses gelu or gelu_tanh)"),
                  (c.qkv_bias and c.out_bias and c.mlp_bias, "gpt2 has biases on every linear layer"),
                  (c.kv_heads == c.n_heads, "gpt2 has no grouped-query attention"),
                  (c.dim_per_head * c.n_heads == c.d_model, "gpt2 needs head_dim = d_model / n_heads"),
                  (c.sliding_window is None, "gpt2 has no sliding window"),
                  (not c.n_experts, "gpt2 has no mixture of experts")]
        return why + [reason for ok, reason in checks if not ok]
    checks = [(c.position == "rope", f"position={c.position!r} ({model_type} uses rope)"),
              (c.norm == "rmsnorm", f"norm={c.norm!r} ({model_type} uses rmsnorm)"),
              (c.mlp == "swiglu", f"mlp={c.mlp!r} ({model_type} uses swiglu)"),
              (bool(c.n_experts) == (model_type == "mixtral"),
               "mixture of experts is mixtral's alone" if c.n_experts else "mixtral needs n_experts > 0")]
    if model_type == "llama":
        checks += [(c.qkv_bias == c.out_bias, "llama's attention_bias covers q, k, v and o together"),
                   (c.sliding_window is None, "llama has no sliding window")]
    elif model_type == "qwen2":
        checks += [(c.qkv_bias and not c.out_bias and not c.mlp_bias,
                    "qwen2 has biases on q, k, v only")]
    else:
        checks += [(not (c.qkv_bias or c.out_bias or c.mlp_bias), f"{model_type} has no biases")]
    return why + [reason for ok, reason in checks if not ok]


def check_exportable(config: ModelConfig, model_type: str) -> None:
    """Raises `CheckpointError` saying why `config` cannot be written as HF `model_type`."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"unknown HF model_type {model_type!r}; known: {', '.join(ARCHITECTURES)}")
    if reasons := _reasons_against(config, model_type):
        raise CheckpointError(f"this config cannot be written as {model_type}: {'; '.join(reasons)}")


def hf_model_type(config: ModelConfig, prefer: str | None = None) -> str:
    """The HF family that computes exactly what `config` does; `prefer` is tried first (e.g. the source's)."""
    if prefer is not None and prefer not in ARCHITECTURES:
        raise CheckpointError(f"unknown HF model_type {prefer!r}; known: {', '.join(ARCHITECTURES)}")
    order = ([prefer] if prefer else []) + [t for t in ARCHITECTURES if t != prefer]
    reasons = {t: _reasons_against(config, t) for t in order}
    for model_type in order:
        if not reasons[model_type]:
            return model_type
    closest = min(order, key=lambda t: len(reasons[t]))
    raise CheckpointError("no Hugging Face family can express this config (closest: "
                          f"{closest}, but {'; '.join(reasons[closest])}); save it lmforge-native instead")


def config_to_hf(
    config: ModelConfig,
    *,
    model_type: str | None = None,
    dtype: str | torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A complete config.json that `transformers.AutoModelForCausalLM` loads as the same model.

    `model_type=None` picks the family: the one the config came from if it still fits,
    else the first that does. Token ids default to those recorded in `config.extra["hf"]`.
    """
    hf_meta = config.extra.get("hf", {}) if isinstance(config.extra.get("hf"), dict) else {}
    if model_type is None:
        source = hf_meta.get("model_type")
        model_type = hf_model_type(config, source if source in ARCHITECTURES else None)
    else:
        check_exportable(config, model_type)
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else hf_meta.get("dtype", "float32")
    c = config
    ids = {"bos_token_id": bos_token_id if bos_token_id is not None else hf_meta.get("bos_token_id"),
           "eos_token_id": eos_token_id if eos_token_id is not None else hf_meta.get("eos_token_id"),
           "pad_token_id": pad_token_id if pad_token_id is not None else hf_meta.get("pad_token_id")}
    head: dict[str, Any] = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type}
    tail: dict[str, Any] = {"tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
                            "use_cache": True, **ids, "dtype": dtype_name, "torch_dtype": dtype_name}
    if model_type == "gpt2":
        body = {"vocab_size": c.vocab_size, "n_positions": c.max_seq_len, "n_embd": c.d_model,
                "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": c.d_ff,
                "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
                "attn_pdrop": c.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "add_cross_attention": False}
        return head | body | tail
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    rope_scaling = None
    if c.rope_scaling is not None:
        params = {k: v for k, v in c.rope_scaling.items() if k != "type"}
        rope_scaling = {"rope_type": c.rope_scaling["type"], **params}
        rope_parameters = {"rope_theta": c.rope_theta, **rope_scaling}
    body = {"vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.kv_heads, "head_dim": c.dim_per_head, "hidden_act": "silu",
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "rope_scaling": rope_scaling, "rope_parameters": rope_parameters, "attention_dropout": c.dropout}
    if model_type == "llama":
        body |= {"attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias, "pretraining_tp": 1}
    elif model_type == "qwen2":
        window = c.sliding_window
        body |= {"use_sliding_window": window is not None, "sliding_window": window,
                 "max_window_layers": 0 if window is not None else c.n_layers,
                 "layer_types": ["sliding_attention" if window else "full_attention"] * c.n_layers}
    else:
        body["sliding_window"] = c.sliding_window
    if model_type == "mixtral":
        body |= {"num_local_experts": c.n_experts, "num_experts_per_tok": c.n_experts_per_token,
                 "router_aux_loss_coef": c.moe_aux_loss_coef, "router_jitter_noise": 0.0,
                 "output_router_logits": False}
    return head | body | tail


# ---------------------------------------------------------------------------------- state dicts
# Llama-family names: (lmforge prefix, HF prefix), first match wins; {i} is a layer, {e} an expert.
_LLAMA_RENAMES = [
    ("embed.", "model.embed_tokens."),
    ("final_norm.", "model.norm."),
    ("lm_head.", "lm_head."),
    ("blocks.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
    ("blocks.{i}.mlp_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("blocks.{i}.attn.", "model.layers.{i}.self_attn."),
    ("blocks.{i}.mlp.router.", "model.layers.{i}.block_sparse_moe.gate."),
    ("blocks.{i}.mlp.experts.{e}.gate_proj.", "model.layers.{i}.block_sparse_moe.experts.{e}.w1."),
    ("blocks.{i}.mlp.experts.{e}.down_proj.", "model.layers.{i}.block_sparse_moe.experts.{e}.w2."),
    ("blocks.{i}.mlp.experts.{e}.up_proj.", "model.layers.{i}.block_sparse_moe.experts.{e}.w3."),
    ("blocks.{i}.mlp.", "model.layers.{i}.mlp."),
]


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern)


_TO_HF = [(_template_regex(src), dst) for src, dst in _LLAMA_RENAMES]
_FROM_HF = [(_template_regex(dst), src) for src, dst in _LLAMA_RENAMES]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if m := pattern.match(name):
            return template.format(**m.groupdict()) + name[m.end():]
    return None


# Buffers that old checkpoints saved next to the weights: causal masks and RoPE tables.
_IGNORED_HF = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")


def normalize_hf_names(names: list[str], model_type: str) -> dict[str, str | None]:
    """Maps each name found in an HF file to its canonical HF name (None: a buffer to ignore).

    Canonical means what `state_dict_to_hf` writes: GPT-2 names under `transformer.`
    (the original OpenAI upload has none) and Mixtral's router under `block_sparse_moe`
    (transformers 5 keeps it in memory under `mlp`).
    """
    out: dict[str, str | None] = {}
    for name in names:
        if _IGNORED_HF.search(name):
            out[name] = None
        elif model_type == "gpt2" and name != "lm_head.weight" and not name.startswith("transformer."):
            out[name] = "transformer." + name
        elif model_type == "mixtral" and re.match(r"model\.layers\.\d+\.mlp\.gate\.weight$", name):
            out[name] = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        else:
            out[name] = name
    return out


def state_dict_to_hf(
    state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str | None = None,
    *, fused_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF names and layouts (tied head stored once, as transformers does).

    Mixtral experts are written per expert (`experts.{e}.w1/w2/w3`), the layout that
    `save_pretrained` writes and every tool reads; `fused_experts=True` gives
    transformers 5's in-memory layout instead (`experts.gate_up_proj`, `experts.down_proj`).
    """
    model_type = model_type or hf_model_type(config, config.extra.get("hf", {}).get("model_type"))
    check_exportable(config, model_type)
    if model_type == "gpt2":
        return _gpt2_to_hf(state, config)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        hf_name = _rename(name, _TO_HF)
        if hf_name is None:
            raise CheckpointError(f"tensor {name!r} has no {model_type} counterpart")
        out[hf_name] = tensor
    if fused_experts and model_type == "mixtral":
        out = _fuse_experts(out, config)
    return out


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str | None = None,
) -> dict[str, torch.Tensor]:
    """HF tensors (from a file or from a live `transformers` model) -> lmforge names and layouts.

    Checks the result against `config`: missing, unexpected and mis-shaped tensors are
    a `CheckpointError` that names them.
    """
    model_type = model_type or config.extra.get("hf", {}).get("model_type") or hf_model_type(config)
    names = normalize_hf_names(list(hf_state), model_type)
    state = {names[k]: v for k, v in hf_state.items() if names[k] is not None}
    if model_type == "mixtral" and any(k.endswith(".experts.gate_up_proj") for k in state):
        state = _split_experts(state, config)
    if "lm_head.weight" in state and config.tie_embeddings:
        embed_name = "transformer.wte.weight" if model_type == "gpt2" else "model.embed_tokens.weight"
        head = state.pop("lm_head.weight")
        embed = state.get(embed_name)
        if embed is not None and head.device.type != "meta" and not torch.equal(head, embed):
            raise CheckpointError("the config ties the LM head to the embedding, but the checkpoint's "
                                  "lm_head.weight differs from it (set tie_word_embeddings=false)")
    if model_type == "gpt2":
        out = _gpt2_from_hf(state, config)
    else:
        out, unknown = {}, []
        for name, tensor in state.items():
            ours = _rename(name, _FROM_HF)
            if ours is None:
                unknown.append(name)
            else:
                out[ours] = tensor
        if unknown:
            raise CheckpointError(f"unexpected tensor(s) for {model_type}: {_listing(unknown)}")
    check_state_dict(out, config, what=f"the converted {model_type} checkpoint")
    return out


def _fuse_experts(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in hf.items() if ".block_sparse_moe.experts." not in k}
    for i in range(config.n_layers):
        p = f"model.layers.{i}.block_sparse_moe"
        experts = range(config.n_experts)
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([hf[f"{p}.experts.{e}.w1.weight"], hf[f"{p}.experts.{e}.w3.weight"]])
             for e in experts])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [hf[f"{p}.experts.{e}.w2.weight"] for e in experts])
        out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(f"{p}.gate.weight")
    return out


def _split_experts(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers 5 fuses each layer's experts into 3-D tensors; split them back per expert."""
    out = dict(hf)
    for i in range(config.n_layers):
        gate_up = out.pop(f"model.layers.{i}.mlp.experts.gate_up_proj", None)
        down = out.pop(f"model.layers.{i}.mlp.experts.down_proj", None)
        if gate_up is None or down is None:
            continue  # reported as missing tensors by the final check
        expected = (config.n_experts, 2 * config.d_ff, config.d_model)
        if tuple(gate_up.shape) != expected:
            raise CheckpointError(f"model.layers.{i}.mlp.experts.gate_up_proj: checkpoint has "
                                  f"{tuple(gate_up.shape)}, config expects {expected}")
        p = f"model.layers.{i}.block_sparse_moe.experts"
        for e in range(gate_up.shape[0]):
            out[f"{p}.{e}.w1.weight"], out[f"{p}.{e}.w3.weight"] = gate_up[e].chunk(2, dim=0)
            out[f"{p}.{e}.w2.weight"] = down[e]
    return out


def _gpt2_pairs(config: ModelConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(lmforge, HF) name pairs: those copied as they are, and Conv1D weights stored transposed."""
    plain = [("embed.weight", "transformer.wte.weight"), ("pos_embed.weight", "transformer.wpe.weight"),
             ("final_norm.weight", "transformer.ln_f.weight"), ("final_norm.bias", "transformer.ln_f.bias")]
    if not config.tie_embeddings:
        plain.append(("lm_head.weight", "lm_head.weight"))
    transposed = []
    for i in range(config.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            plain += [(f"{b}{ours}.weight", f"{h}{theirs}.weight"), (f"{b}{ours}.bias", f"{h}{theirs}.bias")]
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            plain.append((f"{b}{ours}.bias", f"{h}{theirs}.bias"))
            transposed.append((f"{b}{ours}.weight", f"{h}{theirs}.weight"))
    return plain, transposed


def _gpt2_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 stores Conv1D weights as [in, out] (transposed) and q, k, v fused into c_attn."""
    plain, transposed = _gpt2_pairs(config)
    out = {theirs: state[ours] for ours, theirs in plain}
    out |= {theirs: state[ours].t().contiguous() for ours, theirs in transposed}
    for i in range(config.n_layers):
        qkv, h = [f"blocks.{i}.attn.{p}_proj" for p in "qkv"], f"transformer.h.{i}.attn.c_attn"
        out[f"{h}.weight"] = torch.cat([state[f"{n}.weight"] for n in qkv]).t().contiguous()
        out[f"{h}.bias"] = torch.cat([state[f"{n}.bias"] for n in qkv])
    return out


def _gpt2_from_hf(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    expected = _gpt2_to_hf(expected_state(config), config)
    check_shapes({k: tuple(v.shape) for k, v in hf.items()},
                       {k: tuple(v.shape) for k, v in expected.items()}, "the gpt2 checkpoint")
    plain, transposed = _gpt2_pairs(config)
    out = {ours: hf[theirs] for ours, theirs in plain}
    out |= {ours: hf[theirs].t().contiguous() for ours, theirs in transposed}
    for i in range(config.n_layers):
        h = f"transformer.h.{i}.attn.c_attn"
        weights, biases = hf[f"{h}.weight"].t().chunk(3, dim=0), hf[f"{h}.bias"].chunk(3, dim=0)
        for p, w, bias in zip("qkv", weights, biases):
            out[f"blocks.{i}.attn.{p}_proj.weight"] = w.contiguous()
            out[f"blocks.{i}.attn.{p}_proj.bias"] = bias.contiguous()
    return out


# ---------------------------------------------------------------------------------- checking
def expected_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict a `Transformer(config)` has, as meta tensors (shapes and dtypes, no memory)."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(config).state_dict()


def check_state_dict(state: Mapping[str, Any], config: ModelConfig, *, what: str = "the state dict") -> None:
    """Raises `CheckpointError` naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in expected_state(config).items()}
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, what)


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                 what: str) -> None:
    """Raises `CheckpointError` listing missing and unexpected names and shapes that differ."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_listing(unexpected)}")
    wrong = [f"{k}: checkpoint has {found[k]}, config expects {expected[k]}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if wrong:
        problems.append(f"shape mismatch: {_listing(wrong, sep='; ')}")
    if problems:
        raise CheckpointError(f"{what} does not match the config: " + ". ".join(problems))


def _listing(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")
