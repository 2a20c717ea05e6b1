"""Open a model for generation from whatever the user points at.

A checkpoint folder (Hugging Face layout, written by lmforge or by transformers), a
quantized folder (`lmforge quantize`: loaded into the engine's int8/int4 layers), a
`.gguf` file (llama.cpp's format: weights dequantized on load, or with `keep` its 4- and 8-bit
blocks as the engine's int layers), or the short name of a packaged sample such as `smollm2`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.hub import resolve_model_path
from lmforge.infer.quant import Int4Linear, Int8Linear, QuantizedLinear, QuantMode
from lmforge.infer.quantized_folder import is_quantized_folder, load_quantized
from lmforge.model.gguf import KeptBlocks
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    path: Path

    def stop_ids(self) -> list[int]:
        return stop_ids(self.tokenizer)


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids that end a reply: EOS plus the end-of-turn tokens chat templates use."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>"):
        if name in tokenizer.special_tokens:
            ids.add(tokenizer.special_tokens[name])
    return sorted(ids)


def load_model(spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               keep: Collection[QuantMode] = ()) -> LoadedModel:
    """The model and tokenizer `spec` names. `keep` ("int4", "int8") applies to GGUF files: their
    Q4_0/Q4_1 (int4) or Q8_0 (int8) matrices become the engine's int layers holding the
    file's own codes and scales, read once and never dequantized (`gguf_layers`)."""
    path = resolve_model_path(str(spec))
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype, device, keep)
    elif path.is_dir() and is_quantized_folder(path):  # `lmforge quantize` output: int8/int4 layers as stored
        model = load_quantized(path, device=device)
        tokenizer = load_tokenizer(path)
    elif path.is_dir():
        from lmforge.model.checkpoint import load_checkpoint

        model, _config = load_checkpoint(path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(path)
    else:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file")
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, path=path)


def _load_gguf(path: Path, dtype: torch.dtype, device: str,
               keep: Collection[QuantMode]) -> tuple[Transformer, Tokenizer]:
    from lmforge.model.gguf import read_gguf_model

    gguf = read_gguf_model(path, keep=keep)
    state = {k: v.to(dtype) for k, v in gguf.state.items()}
    layers = gguf_layers(gguf.blocks, state, tied=gguf.config.tie_embeddings)
    for name in _unfusable(layers, gguf.config.n_layers):  # back to float, quantized alike later
        state[f"{name}.weight"] = layers.pop(name).dequantize(dtype)
    state |= {f"{name}.{k}": v for name, layer in layers.items() for k, v in layer.state_dict().items()}

    def put_layers(model: Transformer) -> None:  # on the meta device: the real layers are assigned
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)

    model = Transformer.from_state_dict(gguf.config, state, device=device, prepare=put_layers)
    return model, Tokenizer.from_gguf_metadata(gguf.metadata)  # already parsed: don't read the file twice


# Projections the engine fuses into one matrix (`infer.runner`), which must then be of one kind.
_FUSED = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _unfusable(layers: Mapping[str, QuantizedLinear], n_layers: int) -> list[str]:
    """Kept layers whose fusion partners are of another kind or not kept (a file mixing Q4_0 and
    Q8_0 within q/k/v, say): the engine could not fuse them, so they are loaded in float."""
    odd = []
    for i in range(n_layers):
        for group in _FUSED:
            names = [f"blocks.{i}.{n}" for n in group]
            kinds = {(type(layers[n]), layers[n].group_size) if n in layers else None for n in names}
            if len(kinds) > 1:
                odd += [n for n in names if n in layers]
    return odd


def gguf_layers(blocks: Mapping[str, KeptBlocks], state: dict[str, torch.Tensor], *,
                tied: bool = False) -> dict[str, QuantizedLinear]:
    """The engine layer for each kept GGUF matrix, by module name ("blocks.0.attn.q_proj", "lm_head"):
    Q4_0/Q4_1 as `Int4Linear` (codes, f16 step and offset per 32: Q4_0's w = d(q - 8) is offset
    -8d), Q8_0 as `Int8Linear` with a scale per 32 inputs (what Q8_0 stores; one scale per row
    would round every weight again). Biases come from the float `state`; a Q4 matrix whose rows
    the int4 layout cannot pack (not a multiple of 64) goes into `state` in float instead (a
    `tied` head needs nothing: the embedding is its float copy)."""
    layers: dict[str, QuantizedLinear] = {}
    for key, kept in blocks.items():
        name = key.removesuffix(".weight")
        parts = [torch.from_numpy(np.ascontiguousarray(p)) for p in kept.parts]
        bias = state.get(f"{name}.bias")
        if kept.kind == "int8":
            layers[name] = Int8Linear(*parts, bias)
        elif parts[0].shape[1] % 64 == 0:
            layers[name] = Int4Linear.from_codes(*parts, bias)
        elif not (tied and name == "lm_head"):
            codes, step, offset = parts
            weight = codes.float() * step.repeat_interleave(32, dim=1) + offset.repeat_interleave(32, dim=1)
            state[key] = weight.to(state["embed.weight"].dtype)
    return layers
