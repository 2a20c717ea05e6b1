"""A LoRA as a llama.cpp adapter: `llama-cli -m base.gguf --lora adapter.gguf` runs base + LoRA.

llama.cpp's adapter file is a GGUF with `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and for each adapted matrix two tensors named after the base's
tensor: `blk.0.attn_q.weight.lora_a` (A, rank x in) and `.lora_b` (B, out x rank).
llama.cpp scales by alpha / rank, so an rsLoRA (alpha / sqrt(rank)) is written with
alpha * sqrt(rank); and since llama.cpp keeps W_q and W_k with their rows reordered for
its RoPE layout, B of q_proj and k_proj is reordered the same way (A is not: it acts on
the input). DoRA has no llama.cpp form: merge the adapter into the model and export that.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from torch import nn

from lmforge.formats.ggml import GGMLType
from lmforge.formats.gguf import TensorData, write_gguf
from lmforge.model.gguf import rows_for_gguf, tensor_names
from lmforge.tune.lora import LoRAConfig, lora_layers
from lmforge.tune.peft_io import AdapterError


def export_lora_gguf(model: nn.Module, config: LoRAConfig, path: str | os.PathLike[str]) -> Path:
    """Write the LoRA layers of `model` (a Llama-architecture model) as a llama.cpp adapter GGUF."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to export")
    if config.dora:
        raise AdapterError("llama.cpp has no DoRA adapters: merge the adapter (lmforge finetune --merge, or "
                           "export the merged model) and export that instead")
    names = tensor_names(model.config)
    tensors = []
    for name, layer in layers.items():
        gguf_name = names.get(f"{name}.weight")
        if gguf_name is None:
            raise AdapterError(f"{name} has no llama.cpp tensor to adapt")
        a = layer.lora_A.weight.detach().float().cpu().numpy()
        b = rows_for_gguf(f"{name}.weight", layer.lora_B.weight.detach().float().cpu().numpy(), model.config)
        tensors += [TensorData(f"{gguf_name}.lora_a", a.shape, GGMLType.F32, np.ascontiguousarray(a)),
                    TensorData(f"{gguf_name}.lora_b", b.shape, GGMLType.F32, np.ascontiguousarray(b))]
    alpha = config.alpha * math.sqrt(config.r) if config.rslora else config.alpha  # llama.cpp: alpha / r
    metadata = {"general.architecture": "llama", "general.type": "adapter", "general.name": "lmforge LoRA",
                "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    return write_gguf(path, metadata, tensors)
