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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
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


# the tensor suffixes of each PEFT method, after the module they adapt
ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "ia3_l")


def peft_tensor_name(param: str, config: ModelConfig) -> str:
    """lmforge parameter name -> PEFT tensor name (`blocks.0.attn.q_proj.lora_A.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
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
    peft = read_adapter_config(folder)
    if peft["peft_type"] != "LORA":
        raise AdapterError(f"{folder} holds a {peft['peft_type']} adapter, not LoRA")
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors

    try:
        tensors, _ = load_tensors(weights)
    except SafetensorsError as err:
        raise AdapterError(f"{folder}: {err}") from err
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
