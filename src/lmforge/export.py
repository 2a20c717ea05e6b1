"""`lmforge export`: any model lmforge opens, written as a Hugging Face folder or a GGUF file.

A Hugging Face folder (config.json, model.safetensors, tokenizer.json) is what
transformers and vLLM load; a GGUF file is what llama.cpp, Ollama and LM Studio run. The
weights are the same numbers in both; only the names, layout and number formats differ
(model/hf.py and model/gguf.py hold the two mappings). A model is exported with its
tokenizer, since ids mean nothing without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Target = Literal["hf", "gguf"]
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


class ExportError(ValueError):
    """A model that cannot be written in the format asked for, and why."""


def gguf_state(model) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Any, Any]]]:
    """(float state dict, GGML blocks) for `export_gguf`: a quantized model's int4 layers become Q4_1
    blocks with the very codes, steps and offsets it holds (any group size that is a multiple of 32
    is a run of Q4_1 blocks sharing one step and offset; 3-bit codes are 4-bit codes below 8), and
    its int8 layers Q8_0 blocks (the per-row scale rounded to f16). A float model: no blocks.

    With tied embeddings and a quantized head the head's blocks become `token_embd`, which
    llama.cpp reads for both the lookup and the output, as lmforge does."""
    from lmforge.formats.ggml import GGMLType, encode_q4_1, encode_q8_0
    from lmforge.infer.quant import Int4Linear, Int8Linear, QuantizedLinear

    state = dict(model.state_dict())
    blocks: dict[str, tuple[Any, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        for buffer in ("qweight", "scale", "packed", "dm"):
            state.pop(f"{name}.{buffer}", None)
        key = "embed.weight" if name == "lm_head" and model.config.tie_embeddings else f"{name}.weight"
        state[key] = module.dequantize()
        if isinstance(module, Int4Linear):
            step, offset = (t.repeat_interleave(module.group_size // 32, dim=1).numpy()
                            for t in module.dm.float().unbind(-1))
            blocks[key] = (GGMLType.Q4_1, encode_q4_1(module.unpack().numpy(), step, offset))
        elif isinstance(module, Int8Linear):
            blocks[key] = (GGMLType.Q8_0, encode_q8_0(module.qweight.numpy(), module.scale.numpy()))
    return state, blocks


@dataclass
class ExportResult:
    source: str
    output: str
    target: Target
    dtype: str
    parameters: int
    bytes: int

    def describe(self) -> str:
        return (f"exported {self.source} -> {self.output} ({self.target}, {self.dtype}, "
                f"{self.parameters / 1e6:.1f}M parameters, {self.bytes / 1e6:.1f} MB)")


def export_model(spec: str | os.PathLike[str], target: Target, output: str | os.PathLike[str], *,
                 dtype: str | None = None) -> ExportResult:
    """Read `spec` (checkpoint folder, run folder, .gguf or sample name) and write it as `target`.

    `dtype` defaults to f32 for a Hugging Face folder and f16 for GGUF.
    """
    from lmforge.hub import resolve_model_path
    from lmforge.infer.loading import load_model

    if target not in ("hf", "gguf"):
        raise ExportError(f"--to must be hf or gguf, got {target!r}")
    dtype = dtype or ("f32" if target == "hf" else "f16")
    allowed = tuple(HF_DTYPES) if target == "hf" else GGUF_DTYPES
    if dtype not in allowed:
        raise ExportError(f"--dtype {dtype} cannot be written to {target}; choose one of {', '.join(allowed)}"
                          + (" (q8_0 is a GGUF block format)" if dtype == "q8_0" else ""))
    source = resolve_model_path(spec)
    output = Path(output).expanduser()
    if output.resolve() == source.resolve():
        raise ExportError(f"{output} is the model being exported; choose another -o")
    loaded = load_model(source)
    model, tokenizer = loaded.model, loaded.tokenizer
    if target == "hf":
        from lmforge.model.checkpoint import save_checkpoint

        state, _blocks = gguf_state(model)  # a quantized model: its rounded weights, in float
        save_checkpoint(output, state, model.config, tokenizer=tokenizer, dtype=HF_DTYPES[dtype],
                        extra={"source": f"lmforge export of {source}"})
        size = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    else:
        from lmforge.model.gguf import export_gguf

        if output.suffix != ".gguf":
            raise ExportError(f"a GGUF export is one file: give -o a name ending in .gguf, not {output}")
        try:
            tokenizer_metadata = tokenizer.gguf_metadata()
        except ValueError as err:
            raise ExportError(f"the tokenizer cannot be stored in GGUF: {err}") from err
        state, blocks = gguf_state(model)
        export_gguf(output, model.config, state, tokenizer_metadata, dtype,  # type: ignore[arg-type]
                    name=source.name, blocks=blocks)
        size = output.stat().st_size
    return ExportResult(source=str(source), output=str(output), target=target, dtype=dtype,
                        parameters=model.config.num_parameters(), bytes=size)
