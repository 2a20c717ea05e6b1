"""Adapters on disk in PEFT's format, so they move between lmforge and Hugging Face `peft`.

A PEFT adapter folder holds `adapter_config.json` (the method and its settings) and
`adapter_model.safetensors` (only the adapter's tensors). Tensor names are the base
model's module names in transformers, under `base_model.model.`, with the method's own
suffix: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. lmforge's
module names (`blocks.0.attn.q_proj`) map onto transformers' through the same table its
checkpoints use (model/hf.py), so this works for the families whose transformers
modules have lmforge's shape: Llama, Qwen2, Mistral (GPT-2 fuses q, k and v into one
`c_attn` and is refused with that reason).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import atomic_folder
from lmforge.model.config import ModelConfig
from lmforge.tune.lora import LoRAConfig, LoRALinear, add_lora, lora_layers

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


def _module_map(model: nn.Module, names: list[str]) -> dict[str, str]:
    return {hf_module_name(name, model.config): name for name in names}


def save_lora(model: nn.Module, folder: str | os.PathLike[str], config: LoRAConfig, *,
              base_model: str | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT LoRA folder, atomically."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for name, layer in layers.items():
        hf = hf_module_name(name, model.config)
        targets.append(hf.rsplit(".", 1)[-1])
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
        if layer.lora_magnitude_vector is not None:
            tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().cpu()
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "use_dora": config.dora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "target_modules": sorted(set(targets)), "modules_to_save": None,
        "layers_to_transform": sorted(config.layers) or None, "inference_mode": True,
    }
    return _write(folder, adapter_config, tensors)


def _write(folder: str | os.PathLike[str], adapter_config: dict[str, Any],
           tensors: dict[str, torch.Tensor]) -> Path:
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


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
    peft = read_adapter_config(folder)
    if peft["peft_type"] != "LORA":
        raise AdapterError(f"{folder} holds a {peft['peft_type']} adapter, not LoRA")
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    tensors = load_file(str(weights))
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
