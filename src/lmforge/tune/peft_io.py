"""Adapters on disk in PEFT's format, so they move between lmforge and Hugging Face `peft`.

A PEFT adapter folder holds `adapter_config.json` (the method and its settings) and
`adapter_model.safetensors` (only the adapter's tensors). Tensor names are the base
model's module names in transformers, under `base_model.model.`, with the method's own
suffix: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. lmforge's
module names (`blocks.0.attn.q_proj`) map onto transformers' through the same table its
checkpoints use (model/hf.py), so this works for the families whose transformers
modules have lmforge's shape: Llama, Qwen2, Mistral (GPT-2 fuses q, k and v into one
`c_attn` and is refused with that reason).

Methods: LoRA (and DoRA, rsLoRA), (IA)^3 and prefix tuning in PEFT's own format, so each
loads in `peft` with the same logits and `peft`'s load here; bottleneck adapters, which
peft does not have, in the same two files with `"peft_type": "LMFORGE_BOTTLENECK"` and
lmforge's parameter names. `read_adapter_config(folder)["peft_type"]` says which.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.atomic import atomic_folder
from lmforge.model.config import ModelConfig
from lmforge.tune.adapters import BottleneckConfig, add_bottleneck, bottleneck_adapters
from lmforge.tune.ia3 import IA3Config, IA3Linear, add_ia3, ia3_layers
from lmforge.tune.lora import LoRAConfig, LoRALinear, add_lora, lora_layers
from lmforge.tune.prefix import ATTRIBUTE as PREFIX_ATTRIBUTE
from lmforge.tune.prefix import PrefixConfig, add_prefix, prefix_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder lmforge cannot read, or an adapter it cannot write in PEFT's format."""


def _hf_family(config: ModelConfig) -> str:
    from lmforge.model.hf import LLAMA_FAMILY, hf_model_type

    family = hf_model_type(config, (config.extra.get("hf") or {}).get("model_type"))
    if family not in LLAMA_FAMILY:
        raise AdapterError(f"PEFT adapters are written for Llama-family models; this is {family} "
                           "(transformers' GPT-2 fuses q, k and v into one c_attn layer)")
    return family


def hf_module_name(name: str, config: ModelConfig) -> str:
    """lmforge module name -> transformers': `blocks.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`."""
    from lmforge.model.hf import state_dict_to_hf

    family = _hf_family(config)
    [hf_name] = state_dict_to_hf({f"{name}.weight": torch.empty(0)}, config, family)
    return hf_name.removesuffix(".weight")


# the tensor suffixes of each PEFT method, after the module they adapt
ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "ia3_l")
PREFIX_PARAM, PREFIX_TENSOR = f"{PREFIX_ATTRIBUTE}.prompt_embeddings", "prompt_embeddings"
BOTTLENECK_PARAM = re.compile(r"blocks\.\d+\.(attn|mlp)_adapter\.(down|up)\.(weight|bias)")
BOTTLENECK_TYPE = "LMFORGE_BOTTLENECK"


def peft_tensor_name(param: str, config: ModelConfig) -> str:
    """lmforge parameter name -> PEFT tensor name (`blocks.0.attn.q_proj.lora_A.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; the prefix's
    `prefix_tuning.prompt_embeddings` -> `prompt_embeddings`; a bottleneck adapter's
    parameters keep their lmforge names, peft having no such method)."""
    if param == PREFIX_PARAM:
        return PREFIX_TENSOR
    if BOTTLENECK_PARAM.fullmatch(param):
        return param
    for suffix in ADAPTER_SUFFIXES:
        if param.endswith("." + suffix):
            return f"{PREFIX}{hf_module_name(param[:-len(suffix) - 1], config)}.{suffix}"
    raise AdapterError(f"{param} is not an adapter tensor PEFT knows")


def lora_adapter_config(config: LoRAConfig, modules: list[str], base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "use_dora": config.dora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules_to_save": None, "layers_to_transform": sorted(config.layers) or None, "inference_mode": True,
    }


def write_adapter_files(folder: Path, adapter_config: dict[str, Any],
                        tensors: dict[str, torch.Tensor]) -> None:
    """The two files of a PEFT adapter, into an existing folder (a staging folder: the caller renames)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")


def save_lora(model: nn.Module, folder: str | os.PathLike[str], config: LoRAConfig, *,
              base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Write the model's LoRA layers as a PEFT LoRA folder (with the tokenizer, if given), atomically."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    tensors = {peft_tensor_name(n, model.config): p for n, p in model.named_parameters() if _is_adapter(n)}
    with atomic_folder(folder) as tmp:
        write_adapter_files(tmp, lora_adapter_config(config, list(layers), base_model), tensors)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def _is_adapter(param: str) -> bool:
    return param.endswith(tuple("." + s for s in ADAPTER_SUFFIXES))


class AdapterStore:
    """A training checkpoint that holds only the adapter: each step folder is a PEFT folder
    (plus the tokenizer and trainer_state/), loadable by `peft` and by `--adapter`."""

    def __init__(self, adapter_config: dict[str, Any], trainable: list[str]) -> None:
        self.adapter_config, self.trainable = adapter_config, list(trainable)

    def write(self, folder: Path, model_state: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer: Any, step: int) -> None:
        tensors = {peft_tensor_name(n, config): model_state[n] for n in self.trainable}
        write_adapter_files(folder, self.adapter_config, tensors)
        if tokenizer is not None:
            tokenizer.save(folder)

    def read(self, folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors

        names = {peft_tensor_name(n, config): n for n in self.trainable}
        try:
            tensors, _ = load_tensors(folder / WEIGHTS_NAME, sorted(names))
        except SafetensorsError as err:
            raise AdapterError(f"cannot resume from {folder}: {err}") from err
        return {names[k]: v for k, v in tensors.items()}


def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} is not an adapter folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{path}: no peft_type: not a PEFT adapter config")
    return config


def lora_config_from_peft(peft: dict[str, Any]) -> LoRAConfig:
    unsupported = {k: peft[k] for k in ("fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias",
                                        "modules_to_save", "layer_replication")
                   if peft.get(k) not in (None, False, {}, [])}
    if unsupported:
        raise AdapterError(f"this LoRA uses settings lmforge does not implement: {unsupported}")
    targets = peft.get("target_modules")
    return LoRAConfig(r=int(peft["r"]), alpha=float(peft["lora_alpha"]), dropout=0.0,
                      target_modules=targets if isinstance(targets, list) else "all-linear",
                      rslora=bool(peft.get("use_rslora")), dora=bool(peft.get("use_dora")),
                      layers=list(peft.get("layers_to_transform") or []))


def load_lora(model: nn.Module, folder: str | os.PathLike[str]) -> LoRAConfig:
    """Add the PEFT LoRA in `folder` to `model` (made by lmforge or by `peft`); its config."""
    peft, tensors = _read_weights(folder, "LORA")
    modules = sorted({key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for key in tensors})
    by_hf = {hf_module_name(name, model.config): name
             for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [m for m in modules if m not in by_hf]
    if missing:
        raise AdapterError(f"{folder}: the adapter targets modules this model does not have: {missing[:4]}")
    config = lora_config_from_peft(peft)
    config.target_modules = [by_hf[m] for m in modules]
    add_lora(model, config)
    with torch.no_grad():
        for hf in modules:
            layer = model.get_submodule(by_hf[hf])
            assert isinstance(layer, LoRALinear)
            _copy(layer.lora_A.weight, tensors, f"{PREFIX}{hf}.lora_A.weight", folder)
            _copy(layer.lora_B.weight, tensors, f"{PREFIX}{hf}.lora_B.weight", folder)
            if layer.lora_magnitude_vector is not None:
                _copy(layer.lora_magnitude_vector, tensors, f"{PREFIX}{hf}.lora_magnitude_vector", folder)
    return config


def _copy(target: torch.Tensor, tensors: dict[str, torch.Tensor], key: str, folder: Any) -> None:
    if key not in tensors:
        raise AdapterError(f"{folder}: {WEIGHTS_NAME} lacks {key}")
    value = tensors[key]
    if tuple(value.shape) != tuple(target.shape):
        raise AdapterError(f"{folder}: {key} has shape {tuple(value.shape)}, this model needs "
                           f"{tuple(target.shape)}")
    target.copy_(value.to(target.dtype))


# how a message names each peft_type
TYPE_NAMES = {"LORA": "LoRA"}


def _read_weights(folder: str | os.PathLike[str],
                  peft_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter config (checked to be `peft_type`) and every tensor of the folder."""
    peft = read_adapter_config(folder)
    if peft["peft_type"] != peft_type:
        wanted = TYPE_NAMES.get(peft_type, peft_type)
        raise AdapterError(f"{folder} holds a {peft['peft_type']} adapter, not {wanted}")
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors

    try:
        tensors, _ = load_tensors(weights)
    except SafetensorsError as err:
        raise AdapterError(f"{folder}: {err}") from err
    return peft, tensors


def _write(folder: str | os.PathLike[str], adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor],
           tokenizer: Any) -> Path:
    with atomic_folder(folder) as tmp:
        write_adapter_files(tmp, adapter_config, tensors)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


# ---------------------------------------------------------------------------------- (IA)^3
def ia3_adapter_config(config: IA3Config, modules: list[str], base_model: str | None) -> dict[str, Any]:
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "target_modules": targets,
        "feedforward_modules": sorted({m.rsplit(".", 1)[-1] for m in modules if config.is_feedforward(m)}),
        "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def save_ia3(model: nn.Module, folder: str | os.PathLike[str], config: IA3Config, *,
             base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Write the model's (IA)^3 vectors as a PEFT IA3 folder (with the tokenizer, if given), atomically."""
    layers = ia3_layers(model)
    if not layers:
        raise AdapterError("the model has no (IA)^3 layers to save")
    tensors = {peft_tensor_name(f"{n}.ia3_l", model.config): layer.ia3_l for n, layer in layers.items()}
    return _write(folder, ia3_adapter_config(config, list(layers), base_model), tensors, tokenizer)


def _peft_feedforward(peft: dict[str, Any], hf_name: str) -> bool:
    """PEFT's rule: a regex string must match the whole module name, a list entry must end it."""
    wanted = peft.get("feedforward_modules") or []
    if isinstance(wanted, str):
        return re.fullmatch(wanted, hf_name) is not None
    return any(hf_name == w or hf_name.endswith("." + w) for w in wanted)


def load_ia3(model: nn.Module, folder: str | os.PathLike[str]) -> IA3Config:
    """Add the PEFT IA3 adapter in `folder` to `model` (made by lmforge or by `peft`); its config."""
    peft, tensors = _read_weights(folder, "IA3")
    unsupported = {k: peft[k] for k in ("fan_in_fan_out", "modules_to_save")
                   if peft.get(k) not in (None, False, [])}
    if unsupported:
        raise AdapterError(f"this IA3 adapter uses settings lmforge does not implement: {unsupported}")
    modules = sorted(key.removeprefix(PREFIX).removesuffix(".ia3_l") for key in tensors)
    by_hf = {hf_module_name(name, model.config): name
             for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [m for m in modules if m not in by_hf]
    if missing:
        raise AdapterError(f"{folder}: the adapter targets modules this model does not have: {missing[:4]}")
    feedforward = [by_hf[m] for m in modules if _peft_feedforward(peft, m)]
    config = IA3Config(target_modules=[by_hf[m] for m in modules], feedforward_modules=feedforward)
    add_ia3(model, config)
    with torch.no_grad():
        for hf in modules:
            layer = model.get_submodule(by_hf[hf])
            assert isinstance(layer, IA3Linear)
            _copy(layer.ia3_l, tensors, f"{PREFIX}{hf}.ia3_l", folder)
    return config


# ---------------------------------------------------------------------------------- prefix tuning
def prefix_adapter_config(config: PrefixConfig, model_config: ModelConfig,
                          base_model: str | None) -> dict[str, Any]:
    """PEFT's PREFIX_TUNING settings; token_dim and num_attention_heads count KV heads (peft's GQA rule)."""
    token_dim = model_config.kv_heads * model_config.dim_per_head
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "num_virtual_tokens": config.num_virtual_tokens, "token_dim": token_dim,
        "num_transformer_submodules": 1, "num_attention_heads": model_config.kv_heads,
        "num_layers": model_config.n_layers, "encoder_hidden_size": token_dim, "prefix_projection": False,
        "modules_to_save": None, "inference_mode": True,
    }


def save_prefix(model: nn.Module, folder: str | os.PathLike[str], config: PrefixConfig, *,
                base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Write the model's prefix as a PEFT PREFIX_TUNING folder (with the tokenizer, if given), atomically."""
    prefix = prefix_of(model)
    if prefix is None:
        raise AdapterError("the model has no prefix to save")
    if prefix.num_virtual_tokens != config.num_virtual_tokens:
        raise AdapterError(f"the model's prefix has {prefix.num_virtual_tokens} virtual tokens, the config "
                           f"says {config.num_virtual_tokens}")
    tensors = {PREFIX_TENSOR: prefix.prompt_embeddings}
    return _write(folder, prefix_adapter_config(config, model.config, base_model), tensors, tokenizer)


def load_prefix(model: nn.Module, folder: str | os.PathLike[str]) -> PrefixConfig:
    """Add the PEFT prefix-tuning adapter in `folder` to `model` (made by lmforge or by `peft`); its config.

    A prefix trained with `prefix_projection` loads too: peft saves the projection's output,
    the keys and values themselves (what it loads for inference).
    """
    peft, tensors = _read_weights(folder, "PREFIX_TUNING")
    cfg = model.config
    expected = {"num_layers": cfg.n_layers, "num_transformer_submodules": 1}
    wrong = {k: peft.get(k) for k, v in expected.items() if peft.get(k, v) != v}
    if wrong:
        raise AdapterError(f"{folder}: this prefix was made for another model ({wrong}; this one has "
                           f"{cfg.n_layers} layers and is decoder-only)")
    config = PrefixConfig(num_virtual_tokens=int(peft["num_virtual_tokens"]))
    add_prefix(model, config)
    with torch.no_grad():
        _copy(prefix_of(model).prompt_embeddings, tensors, PREFIX_TENSOR, folder)
    return config


# ---------------------------------------------------------------------------------- bottleneck adapters
def bottleneck_adapter_config(config: BottleneckConfig, base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": BOTTLENECK_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "activation": config.activation, "dropout": config.dropout,
        "sublayers": list(config.sublayers), "layers_to_transform": sorted(config.layers) or None,
        "inference_mode": True,
    }


def save_bottleneck(model: nn.Module, folder: str | os.PathLike[str], config: BottleneckConfig, *,
                    base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Write the model's bottleneck adapters as an lmforge adapter folder, atomically."""
    adapters = bottleneck_adapters(model)
    if not adapters:
        raise AdapterError("the model has no bottleneck adapters to save")
    tensors = {f"{name}.{p}": t for name, adapter in adapters.items() for p, t in adapter.named_parameters()}
    return _write(folder, bottleneck_adapter_config(config, base_model), tensors, tokenizer)


def load_bottleneck(model: nn.Module, folder: str | os.PathLike[str]) -> BottleneckConfig:
    """Add the bottleneck adapters in `folder` (an lmforge adapter folder) to `model`; their config."""
    peft, tensors = _read_weights(folder, BOTTLENECK_TYPE)
    try:
        config = BottleneckConfig(r=int(peft["r"]), activation=str(peft["activation"]), dropout=0.0,
                                  sublayers=list(peft["sublayers"]),
                                  layers=list(peft.get("layers_to_transform") or []))
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterError(f"{folder}: {CONFIG_NAME} lacks a bottleneck setting ({err})") from err
    add_bottleneck(model, config)
    names = {f"{name}.{p}": t for name, adapter in bottleneck_adapters(model).items()
             for p, t in adapter.named_parameters()}
    stray = sorted(set(tensors) - set(names))
    if stray:
        raise AdapterError(f"{folder}: tensors this model's adapters do not have: {stray[:4]}")
    with torch.no_grad():
        for key, target in names.items():
            _copy(target, tensors, key, folder)
    return config
