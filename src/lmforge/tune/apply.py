"""Put a fine-tuned adapter on a model for inference (`lmforge generate|chat|serve --adapter DIR`).

`load_adapter` reads the folder's `adapter_config.json` and gives the model the form
that costs least at inference:

- LoRA (and DoRA, rsLoRA) and (IA)^3 are linear changes of the weights: they are merged,
  and the model is again a plain `Transformer` with different numbers in its matrices;
- a prefix cannot merge (it is extra keys and values, not a weight change): it stays on
  the model as `model.prefix_tuning`, which `Transformer.forward` applies through a
  cache and the inference engine writes into each sequence's KV cache before its prompt;
- bottleneck adapters cannot merge either (a nonlinearity sits between their two
  matrices): they stay as modules in each block, which the engine's runner calls.

Apply the adapter before quantizing the model (`lmforge.infer.quant.quantize_model`):
LoRA and (IA)^3 merge into floating-point weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from lmforge.tune.ia3 import merge_ia3
from lmforge.tune.lora import freeze, merge_lora
from lmforge.tune.peft_io import (
    BOTTLENECK_TYPE,
    AdapterError,
    load_bottleneck,
    load_ia3,
    load_lora,
    load_prefix,
    read_adapter_config,
)

# peft_type in adapter_config.json -> the method's name (as `lmforge finetune --method` spells it)
METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", BOTTLENECK_TYPE: "adapter"}


def load_adapter(model: nn.Module, folder: str | os.PathLike[str]) -> str:
    """Apply the adapter in `folder` (lmforge- or peft-made) to `model` for inference; the method's name."""
    peft_type = read_adapter_config(folder)["peft_type"]
    if peft_type not in METHODS:
        raise AdapterError(f"{folder} holds a {peft_type} adapter; lmforge runs {', '.join(METHODS)}")
    if peft_type == "LORA":
        load_lora(model, folder)
        merge_lora(model)
    elif peft_type == "IA3":
        load_ia3(model, folder)
        merge_ia3(model)
    elif peft_type == "PREFIX_TUNING":
        load_prefix(model, folder)
    else:
        load_bottleneck(model, folder)
    freeze(model)  # nothing trains at inference
    model.eval()
    return METHODS[peft_type]


def adapter_step(folder: str | os.PathLike[str] | None) -> Callable[[nn.Module], str] | None:
    """What puts `--adapter DIR` on a freshly loaded model (`Engine.from_pretrained(prepare=)`), or None."""
    if folder is None:
        return None
    return lambda model: load_adapter(model, folder)
