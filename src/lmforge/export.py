"""`lmforge export`: any model lmforge opens, written as a Hugging Face folder or a GGUF file.

A Hugging Face folder (config.json, model.safetensors, tokenizer.json) is what
transformers and vLLM load; a GGUF file is what llama.cpp, Ollama and LM Studio run. The
weights are the same numbers in both; only the names, layout and number formats differ
(model/hf.py and model/gguf.py hold the two mappings). A model is exported with its
tokenizer, since ids mean nothing without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.formats.ggml import QUANTIZERS, GGMLType, dequantize, encode_q4_0, encode_q4_1, encode_q8_0
from lmforge.model.gguf import BLOCK_DTYPES, gguf_matrix_type, tensor_names
from lmforge.progress import Progress

Target = Literal["hf", "gguf"]
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k")


class ExportError(ValueError):
    """A model that cannot be written in the format asked for, and why."""


@dataclass
class GGUFPlan:
    """What `export_gguf` writes for a model: float tensors, ready-made blocks for some of them
    (rows in lmforge's order), and what happened to the quantized layers on the way."""

    state: dict[str, torch.Tensor]
    blocks: dict[str, tuple[Any, Any]]
    notes: list[str]


def gguf_state(model) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Any, Any]]]:
    """(float state dict, GGML blocks) keeping a quantized model's own grids (`gguf_plan(model)`)."""
    plan = gguf_plan(model)
    return plan.state, plan.blocks


def gguf_plan(model, dtype: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> GGUFPlan:
    """How a model's quantized layers go into a GGUF of `dtype` (None: each layer's own grid).

    Where the layer's grid *is* a ggml block type, its integers are written as they are:
    an int4 layer is Q4_1 blocks with its very codes, steps and offsets (any group size that
    is a multiple of 32 is a run of blocks sharing one step and offset; 3-bit codes are 4-bit
    codes below 8), or Q4_0 when every offset is -8 steps (a symmetric grid, e.g. read from a
    Q4_0 file); an int8 layer is Q8_0 with its codes, its scales stored in f16 (exact when
    they are f16 numbers already, as a Q8_0 file's are; a per-row fp32 scale is rounded, the
    one rounding, and said). A grid the asked type cannot hold (int4 groups of 64 as Q4_K, or
    int8 as Q4_0) is re-quantized from the layer's dequantized weights, and the notes say so
    with the size of that second rounding. Float layers are `export_gguf`'s to encode.

    With tied embeddings and a quantized head the head's blocks become `token_embd`, which
    llama.cpp reads for both the lookup and the output, as lmforge does. `progress(done, total)`
    follows the quantized layers."""
    from lmforge.infer.quant import QuantizedLinear

    names = tensor_names(model.config)
    state = dict(model.state_dict())
    blocks: dict[str, tuple[Any, Any]] = {}
    kept: dict[str, int] = {}
    requantized: list[tuple[str, float, float]] = []  # (type, squared change, squared weights)
    scale_rounding = 0.0
    as_float: list[str] = []
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for done, (name, module) in enumerate(quantized, 1):
        if progress is not None:
            progress(done, len(quantized))
        for buffer in ("qweight", "scale", "packed", "dm", "act_scale"):
            state.pop(f"{name}.{buffer}", None)
        key = "embed.weight" if name == "lm_head" and model.config.tie_embeddings else f"{name}.weight"
        weight = state[key] = module.dequantize()
        theirs = names.get(key)
        if theirs is None or (dtype is not None and dtype not in BLOCK_DTYPES):  # experts, or a float type
            as_float.append(name)
            continue
        target = BLOCK_DTYPES[dtype] if dtype else None
        exact = _exact_blocks(module, target)
        if exact is None and target is not None:  # the asked type as it applies to this tensor (head, rows)
            exact = _exact_blocks(module, gguf_matrix_type(theirs, tuple(weight.shape), dtype))
        if exact is not None:
            kind, data, rounded = exact
            blocks[key] = (kind, data)
            kept[kind.name] = kept.get(kind.name, 0) + 1
            scale_rounding = max(scale_rounding, rounded)
            continue
        kind = gguf_matrix_type(theirs, tuple(weight.shape), dtype)
        w = weight.numpy()
        data = QUANTIZERS[kind](w)
        change = dequantize(data, kind, w.shape) - w
        blocks[key] = (kind, data)
        requantized.append((kind.name, float((change.astype(np.float64) ** 2).sum()),
                            float((w.astype(np.float64) ** 2).sum())))
    return GGUFPlan(state, blocks, _notes(kept, requantized, scale_rounding, as_float, dtype))


def _exact_blocks(module, kind) -> tuple[Any, np.ndarray, float] | None:
    """(type, blocks, largest relative change of a scale) writing the layer's own integers as
    `kind` (None: its natural type), or None when `kind` cannot hold its grid."""
    from lmforge.infer.quant import Int4Linear, Int8Linear

    if isinstance(module, Int4Linear):
        step, offset = (t.repeat_interleave(module.group_size // 32, dim=1).numpy()
                        for t in module.dm.float().unbind(-1))
        symmetric = bool(np.array_equal(offset, np.float32(-8) * step))
        codes = module.unpack().numpy()
        if kind == GGMLType.Q4_0 or (kind is None and symmetric):
            return (GGMLType.Q4_0, encode_q4_0(codes, step), 0.0) if symmetric else None
        if kind in (None, GGMLType.Q4_1):
            return GGMLType.Q4_1, encode_q4_1(codes, step, offset), 0.0
        return None
    if isinstance(module, Int8Linear) and kind in (None, GGMLType.Q8_0) and module.group_size % 32 == 0:
        scale = module.scale.numpy()
        stored = scale.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            rounded = float(np.nan_to_num(np.abs(stored / scale - 1)).max(initial=0.0))
        repeat = module.group_size // 32
        per_block = np.repeat(scale.reshape(scale.shape[0], -1), repeat, axis=1)
        return GGMLType.Q8_0, encode_q8_0(module.qweight.numpy(), per_block), rounded
    return None


def _notes(kept: dict[str, int], requantized: list[tuple[str, float, float]], scale_rounding: float,
           as_float: list[str], dtype: str | None) -> list[str]:
    notes = []
    if kept:
        notes.append("quantized layers written with their own integers: "
                     + ", ".join(f"{n} as {kind}" for kind, n in sorted(kept.items())))
    if scale_rounding:
        notes.append(f"int8 scales rounded to f16 for Q8_0 (largest relative change {scale_rounding:.1e}; "
                     f"codes kept)")
    by_type: dict[str, list[float]] = {}
    for kind, change, total in requantized:
        acc = by_type.setdefault(kind, [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += change
        acc[2] += total
    for kind, (count, change, total) in sorted(by_type.items()):
        notes.append(f"{count} quantized layers re-quantized to {kind} from their dequantized weights (their "
                     f"grid has no exact {kind} form): a second rounding, RMS change "
                     f"{100 * (change / max(total, 1e-30)) ** 0.5:.2f}% of the weights' RMS")
    if as_float:
        kind = dtype or "f32"
        notes.append(f"{len(as_float)} quantized layers written as their dequantized weights in {kind}"
                     + (" (exact)" if kind == "f32" else " (rounded)"))
    return notes


@dataclass
class ExportResult:
    source: str
    output: str
    target: Target
    dtype: str
    parameters: int
    bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGUF: how many tensors of each ggml type
    notes: list[str] = field(default_factory=list)  # what happened to quantized layers on the way

    def describe(self) -> str:
        line = (f"exported {self.source} -> {self.output} ({self.target}, {self.dtype}, "
                f"{self.parameters / 1e6:.1f}M parameters, {self.bytes / 1e6:.1f} MB)")
        if self.tensor_types:
            line += "\n  tensors: " + ", ".join(f"{n} {kind}" for kind, n in self.tensor_types.items())
        return line + "".join(f"\n  {note}" for note in self.notes)


def export_model(spec: str | os.PathLike[str], target: Target, output: str | os.PathLike[str], *,
                 dtype: str | None = None, progress: Progress | None = None) -> ExportResult:
    """Read `spec` (checkpoint folder, run folder, quantized folder, .gguf or sample name) and write it
    as `target`.

    `dtype` defaults to f32 for a Hugging Face folder. For GGUF it defaults to what the source
    holds: quantized layers (of a quantized folder, or a GGUF's Q4_0/Q4_1/Q8_0 matrices) keep
    their own integers, float matrices are f32; a block type (q8_0, q4_0, q4_1, q4_k) applies
    to every matrix, re-quantizing quantized layers only where their grid has no exact form in
    it (`gguf_plan`), and the result's notes say which. `progress` shows the slow steps.
    """
    from lmforge.hub import resolve_model_path
    from lmforge.infer.loading import load_model

    if target not in ("hf", "gguf"):
        raise ExportError(f"--to must be hf or gguf, got {target!r}")
    allowed = tuple(HF_DTYPES) if target == "hf" else GGUF_DTYPES
    if dtype is not None and dtype not in allowed:
        raise ExportError(f"--dtype {dtype} cannot be written to {target}; choose one of {', '.join(allowed)}"
                          + (f" ({dtype} is a GGUF block format)" if dtype in BLOCK_DTYPES else ""))
    source = resolve_model_path(spec)
    output = Path(output).expanduser()
    if output.resolve() == source.resolve():
        raise ExportError(f"{output} is the model being exported; choose another -o")
    if target == "gguf" and output.suffix != ".gguf":
        raise ExportError(f"a GGUF export is one file: give -o a name ending in .gguf, not {output}")
    if target == "hf":
        from lmforge.model.checkpoint import save_checkpoint

        dtype = dtype or "f32"
        loaded = load_model(source)
        state, _blocks = gguf_state(loaded.model)  # a quantized model: its rounded weights, in float
        save_checkpoint(output, state, loaded.model.config, tokenizer=loaded.tokenizer,
                        dtype=HF_DTYPES[dtype], extra={"source": f"lmforge export of {source}"})
        return ExportResult(source=str(source), output=str(output), target=target, dtype=dtype,
                            parameters=loaded.model.config.num_parameters(),
                            bytes=sum(f.stat().st_size for f in output.iterdir() if f.is_file()))
    from lmforge.formats.gguf import GGUFFile
    from lmforge.model.gguf import export_gguf

    loaded = load_model(source, keep=("int4", "int8"))  # a GGUF's 4/8-bit blocks as int layers: kept exactly
    try:
        tokenizer_metadata = loaded.tokenizer.gguf_metadata()
    except ValueError as err:
        raise ExportError(f"the tokenizer cannot be stored in GGUF: {err}") from err
    plan = gguf_plan(loaded.model, dtype, progress and progress.phase("quantized layers"))
    export_gguf(output, loaded.model.config, plan.state, tokenizer_metadata, dtype or "f32",  # type: ignore[arg-type]
                name=source.name, blocks=plan.blocks, progress=progress and progress.phase("tensors written"))
    types: dict[str, int] = {}
    for info in GGUFFile(output).tensors.values():
        types[info.ggml_type.name] = types.get(info.ggml_type.name, 0) + 1
    return ExportResult(source=str(source), output=str(output), target=target, dtype=dtype or "source",
                        parameters=loaded.model.config.num_parameters(), bytes=output.stat().st_size,
                        tensor_types=dict(sorted(types.items(), key=lambda kv: -kv[1])), notes=plan.notes)
