"""Quantize a whole model: round-to-nearest, GPTQ or AWQ, into the engine's int8/int4 layers.

Every linear layer of every block is replaced by an `Int8Linear` or `Int4Linear` holding
exactly the grid values the method chose, so what was measured is what the engine runs.
The LM head (for tied embeddings: a copy of the embedding matrix) is rounded separately,
by default to 8 bits per channel as GGUF files usually keep it: it is the model's most
sensitive matrix, and a fifth of SmolLM2's weights.

- `rtn`: each group's full range, rounded to nearest. No data. The baseline.
- `gptq`: block by block over calibration text (`layerwise.walk_blocks`); each layer
  rounded by GPTQ from its inputs' Hessian, in "true sequential" order (AutoGPTQ's
  default): q/k/v, then o_proj on what the rounded q/k/v produce, then gate/up, then
  down_proj on what the rounded gate/up produce (`sequential=False`: every layer from the
  inputs the block saw before any of them changed).
- `awq`: block by block, scales folded in and ranges clipped (`awq.awq_block`), then
  every layer rounded to nearest.
- `smoothquant` (8 bits only): block by block, activation outliers moved into the weights
  (`smoothquant.smooth_block`), then every layer becomes W8A8: int8 weights and int8
  activations (`Int8ActLinear`, per-token or calibrated static scales).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmforge.compress.awq import awq_block
from lmforge.compress.gptq import gptq
from lmforge.compress.grid import Grid, GridError
from lmforge.compress.layerwise import linear_layers, set_module, walk_blocks
from lmforge.compress.smoothquant import SEARCH_ROWS, smooth_block, w8a8_block
from lmforge.infer.quant import ActivationScales, QuantizedLinear, quantize_linear, weight_bytes
from lmforge.model.transformer import Transformer

Method = Literal["rtn", "gptq", "awq", "smoothquant"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")


@dataclass
class QuantizeReport:
    method: str
    bits: int
    group_size: int
    head: str
    layers: int = 0
    bytes_before: int = 0  # weight bytes a decode step reads
    bytes_after: int = 0
    seconds: float = 0.0
    calibration_tokens: int = 0
    details: dict = field(default_factory=dict)  # per method: GPTQ's losses, AWQ's alphas

    def describe(self) -> str:
        grid = f"{self.bits}-bit" + (f", groups of {self.group_size}" if self.bits < 8 else ", per channel")
        if self.method == "smoothquant":
            scales = self.details["activations"]
            grid = f"W8A8 (int8 weights per channel, int8 activations with {scales} scales)"
        calibration = f" on {self.calibration_tokens:,} calibration tokens" if self.calibration_tokens else ""
        return (f"{self.method}: {self.layers} linear layers to {grid}{calibration}, head {self.head}; "
                f"weights read per token {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
                f"({self.seconds:.0f} s)")


def _round_to_nearest(block: nn.Module, grid: Grid) -> int:
    count = 0
    for name, layer in linear_layers(block).items():
        codes, step, offset = grid.rtn(layer.weight)
        set_module(block, name, grid.layer(codes, step, offset, layer.bias).to(layer.weight.device))
        count += 1
    return count


def sequential_stages(block: nn.Module) -> list[list[str]]:
    """The block's linear layers in the order their inputs depend on each other: q/k/v (one input),
    o, gate/up (one input), down; anything else (MoE experts, GPT-2's MLP) in a last stage."""
    names = list(linear_layers(block))
    stages = [[n for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj") if n in names], ["attn.o_proj"],
              [n for n in ("mlp.gate_proj", "mlp.up_proj") if n in names], ["mlp.down_proj"]]
    stages = [[n for n in stage if n in names] for stage in stages]
    placed = {n for stage in stages for n in stage}
    stages.append([n for n in names if n not in placed])
    return [stage for stage in stages if stage]


def check_grid(model: Transformer, grid: Grid) -> None:
    """Fail before any work if some layer cannot be stored on this grid."""
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise GridError("the model is already quantized: start from a float model")
    for block in model.blocks:
        for name, layer in linear_layers(block).items():
            try:
                grid.group_of(layer.in_features)
            except GridError as err:
                raise GridError(f"{name}: {err}") from None


@torch.no_grad()
def quantize_model(model: Transformer, method: Method, grid: Grid, *,
                   calibration: torch.Tensor | None = None,
                   head: Literal["int8", "same", "none"] = "int8", act_order: bool = False,
                   damp: float = 0.01, sequential: bool = True, batch_size: int = 8,
                   activations: ActivationScales = "dynamic", alpha: float | None = None,
                   progress: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantize `model` in place; `calibration` [samples, tokens] ids for gptq, awq and smoothquant
    (whose `activations` scales are dynamic or static, and `alpha` fixed or, None, searched)."""
    if method not in METHODS:
        raise GridError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in CALIBRATED and calibration is None:
        raise GridError(f"{method} needs calibration text")
    if head not in ("int8", "same", "none"):
        raise GridError(f"head must be int8, same or none, got {head!r}")
    if act_order and method != "gptq":
        raise GridError("act-order is a GPTQ option (rtn and awq round every weight on its own)")
    if method == "smoothquant" and grid.bits != 8:
        raise GridError(f"smoothquant rounds weights and activations to 8 bits, got {grid.bits} bits")
    if alpha is not None and not 0 <= alpha <= 1:
        raise GridError(f"SmoothQuant's alpha must be between 0 and 1, got {alpha}")
    if not 0 < damp < 1:
        raise GridError(f"damp must be between 0 and 1 (a fraction of the Hessian's mean diagonal), "
                        f"got {damp}")
    check_grid(model, grid)
    report = QuantizeReport(method, grid.bits, grid.group_size if grid.bits < 8 else 0, head,
                            bytes_before=weight_bytes(model))
    started = time.perf_counter()
    model.requires_grad_(False)
    if method == "rtn":
        report.layers = sum(_round_to_nearest(block, grid) for block in model.blocks)
    elif method == "gptq":
        losses: dict[str, float] = {}

        def visit(index, block, inputs):
            for stage, names in enumerate(sequential_stages(block)):
                if stage and sequential:  # inputs as the layers rounded so far now produce them
                    inputs.refresh(names)
                for name in names:
                    quantize_layer(index, block, name, inputs)
            inputs.clear()

        def quantize_layer(index, block, name, inputs):
            layer = block.get_submodule(name)
            report.layers += 1
            if not inputs[name].seen:  # an expert no calibration token was routed to: nothing to fit
                codes, step, offset = grid.rtn(layer.weight)
            else:
                result = gptq(layer.weight, inputs[name].hessian(), grid, damp=damp, act_order=act_order)
                losses[f"blocks.{index}.{name}"] = result.loss
                codes, step, offset = result.codes, result.step, result.offset
            set_module(block, name, grid.layer(codes, step, offset, layer.bias).to(layer.weight.device))

        walk_blocks(model, calibration, visit, batch_size=batch_size, progress=progress)
        report.details = {"loss": losses, "act_order": act_order, "damp": damp, "sequential": sequential}
    elif method == "awq":
        alphas: dict[str, float] = {}

        def visit(index, block, inputs):
            for name, chosen in awq_block(block, inputs, grid).items():
                alphas[f"blocks.{index}.{name}"] = chosen
            inputs.clear()

        walk_blocks(model, calibration, visit, xtx=False, max_samples=4096, batch_size=batch_size,
                    progress=progress)
        report.layers = sum(_round_to_nearest(block, grid) for block in model.blocks)
        report.details = {"alpha": alphas}
    elif method == "smoothquant":
        alphas = {}

        def visit(index, block, inputs):
            for name, chosen in smooth_block(block, inputs, alpha).items():
                alphas[f"blocks.{index}.{name}"] = chosen
            report.layers += w8a8_block(block, inputs, activations)
            inputs.clear()

        walk_blocks(model, calibration, visit, xtx=False, max_samples=SEARCH_ROWS if alpha is None else 0,
                    batch_size=batch_size, progress=progress)
        report.details = {"alpha": alphas, "activations": activations}
    if calibration is not None and method in CALIBRATED:
        report.calibration_tokens = calibration.numel()
    quantize_head(model, grid, head)
    report.bytes_after = weight_bytes(model)
    report.seconds = time.perf_counter() - started
    return report


def quantize_head(model: Transformer, grid: Grid, head: str) -> None:
    """Round the LM head (int8 per channel, the body's grid by RTN, or "none"); a tied embedding then
    looks up the rounded rows, as the saved folder will."""
    if head == "none":
        return
    weight = model.head_weight
    if head == "same" and grid.bits < 8:  # round-to-nearest on the body's grid
        model.lm_head = grid.layer(*grid.rtn(weight), None).to(weight.device)
    else:
        model.lm_head = quantize_linear(weight, "int8")
    if model.config.tie_embeddings:  # the saved folder keeps only the rounded head; so does the lookup
        with torch.no_grad():
            model.embed.weight.copy_(model.lm_head.dequantize(model.embed.weight.dtype))
