"""Quantized model folders: what `lmforge quantize` writes, and `generate`, `serve` and `chat` load.

A quantized model keeps its integers: `model.safetensors` holds each quantized layer's
buffers as the engine's layers store them (`Int8Linear`: int8 `qweight` + fp32 `scale`;
`Int4Linear`: uint8 `packed` codes + fp16 `dm` steps and offsets; W8A8's `Int8ActLinear`
adds its activation scale), every other tensor as
it was, and lmforge.json lists each quantized layer with its format, so loading builds
those layers and reads the integers straight in: no float weights in between, nothing
rounded twice. With tied embeddings and a quantized head, only the head is stored and
the embedding table is its dequantized copy (the lookup then sees the same rounded
rows the head multiplies with), so the file does not carry a float copy of the largest
matrix. Only lmforge reads this layout (no config.json: transformers would misread it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.atomic import atomic_folder
from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors, read_header
from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.infer.quant import Int4Linear, Int8ActLinear, Int8Linear, QuantizedLinear
from lmforge.model.checkpoint import CheckpointError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

FORMAT = "lmforge-quantized"
LMFORGE_NAME = "lmforge.json"
WEIGHTS_NAME = "model.safetensors"


def is_quantized_folder(path: Path) -> bool:
    info = path / LMFORGE_NAME
    if not path.is_dir() or not info.is_file():
        return False
    try:
        return read_json(info, allow_nonfinite=True).get("format") == FORMAT
    except (JSONInputError, AttributeError):
        return False


def _layer_entry(layer: QuantizedLinear) -> dict[str, Any]:
    if isinstance(layer, Int4Linear):
        return {"format": "int4", "group_size": layer.group_size}
    if isinstance(layer, Int8ActLinear):
        return {"format": "int8", "activations": layer.activations}
    return {"format": "int8"}


def save_quantized(folder: str | Path, model: Transformer, *, tokenizer: Any = None,
                   report: dict[str, Any] | None = None, source: str = "") -> Path:
    """Write a model with quantized layers to `folder` atomically; `report` (what was done) goes
    into lmforge.json."""
    folder = Path(folder)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not quantized:
        raise CheckpointError("the model has no quantized layer: save it with save_checkpoint")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tied_head = model.config.tie_embeddings and "lm_head" in quantized
    if tied_head:
        state.pop("embed.weight")
    info = {"format": FORMAT, "format_version": 1, "source": source,
            "config": json.loads(json.dumps(model.config.to_dict())),
            "quantized_layers": {name: _layer_entry(layer) for name, layer in quantized.items()},
            "embedding_from_head": tied_head, "compression": report or {}}
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / LMFORGE_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder


def _empty_layer(entry: Any, linear: torch.nn.Module, name: str, where: Path) -> QuantizedLinear:
    if not isinstance(entry, dict) or entry.get("format") not in ("int8", "int4"):
        raise CheckpointError(f"{where}: quantized layer {name!r} has no valid format (int8 or int4)")
    out_features, in_features, has_bias = linear.out_features, linear.in_features, linear.bias is not None
    bias = torch.zeros(out_features) if has_bias else None
    if entry["format"] == "int8":
        codes, scale = torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features)
        activations = entry.get("activations")
        if activations is None:
            return Int8Linear(codes, scale, bias)
        if activations not in ("dynamic", "static"):
            raise CheckpointError(f"{where}: quantized layer {name!r} has activations {activations!r} "
                                  f"(dynamic or static)")
        return Int8ActLinear(codes, scale, bias, activations=activations)
    group = entry.get("group_size")
    if not isinstance(group, int) or group < 32 or group % 32 or in_features % group or in_features % 64:
        raise CheckpointError(f"{where}: quantized layer {name!r} has an impossible group size {group!r} for "
                              f"{in_features} inputs")
    return Int4Linear(torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
                      torch.zeros(out_features, in_features // group, 2, dtype=torch.float16), group, bias)


def load_quantized(folder: str | Path, *, device: str = "cpu") -> Transformer:
    """The model a quantized folder holds, with the engine's int8/int4 layers, in eval mode."""
    folder = Path(folder)
    info_path = folder / LMFORGE_NAME
    try:
        info = read_json(info_path, allow_nonfinite=True)
    except JSONInputError as err:
        raise CheckpointError(f"{info_path}: not readable JSON ({err.reason})") from err
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_path}: expected a JSON object")
    layers = info.get("quantized_layers")
    if not isinstance(info.get("config"), dict) or not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{info_path}: a quantized folder needs 'config' and 'quantized_layers'")
    try:
        config = ModelConfig.from_dict(info["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{info_path}: bad config: {err}") from err
    def put_layers(model: Transformer) -> None:  # on the meta device: shapes and dtypes only
        for name, entry in layers.items():
            if name == "lm_head" and "lm_head" not in model._modules:
                linear = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
            else:
                try:
                    linear = model.get_submodule(name)
                except AttributeError:
                    raise CheckpointError(f"{info_path}: no layer {name!r} in this architecture") from None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    _empty_layer(entry, linear, name, info_path))

    with torch.device("meta"):
        skeleton = Transformer(config)
        put_layers(skeleton)
    expected = skeleton.state_dict()
    from_head = bool(info.get("embedding_from_head"))
    if from_head:
        expected.pop("embed.weight")
    weights = folder / WEIGHTS_NAME
    try:
        stored = read_header(weights).tensors
        missing = sorted(set(expected) - set(stored))
        if missing:
            raise CheckpointError(f"{weights}: missing tensors {', '.join(missing[:5])}")
        for name, tensor in expected.items():
            if tuple(stored[name]["shape"]) != tuple(tensor.shape):
                raise CheckpointError(f"{weights}: {name} has shape {tuple(stored[name]['shape'])}, the "
                                      f"model needs {tuple(tensor.shape)}")
        tensors, _ = load_tensors(weights, list(expected))
    except SafetensorsError as err:
        raise CheckpointError(str(err)) from err
    for name, tensor in tensors.items():
        if tensor.dtype != expected[name].dtype:
            raise CheckpointError(f"{weights}: {name} is stored as {tensor.dtype}, the layer needs "
                                  f"{expected[name].dtype}")
    if from_head:  # the lookup table is the rounded head's rows
        head = skeleton.lm_head.to_empty(device="cpu")
        head.load_state_dict({k.removeprefix("lm_head."): v for k, v in tensors.items()
                              if k.startswith("lm_head.")})
        tensors["embed.weight"] = head.dequantize()
    model = Transformer.from_state_dict(config, tensors, device=device, prepare=put_layers)
    return model.eval().requires_grad_(False)
