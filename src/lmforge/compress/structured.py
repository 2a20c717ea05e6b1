"""Structured pruning: remove whole MLP channels, attention head groups or blocks, so the matrices
really shrink and decoding gets faster (zeros in a dense matrix cost as much as any number).

Which parts go is decided by how much they contribute on calibration text:

- **MLP channels**: hidden channel c of a block matters as much as its activation norm
  times the norm of the down-projection column it feeds, ||h_c|| * ||W_down[:, c]|| (the
  size of its contribution to the block's output; Wanda's score, summed over a column).
  The same number of channels goes from every block (the model keeps one d_ff), rounded
  so d_ff stays a multiple of 64 (the engine's int4 groups).
- **Attention heads**, by key/value group (under grouped-query attention a KV head and
  the query heads that share it go together): the norm of the group's slice of the
  attention output times the norm of its o_proj columns. The same number per block.
- **Blocks**: ShortGPT's block influence, 1 - cos(x_in, x_out) averaged over calibration
  tokens: a block whose output is nearly its input changes little and goes first.

Channels and heads are chosen block by block on the shrunk model's own activations
(`layerwise.walk_blocks`), blocks from one pass of the original model. The result is an
ordinary, smaller model: a new config (d_ff, heads or layers), a normal checkpoint that
transformers loads. No weight is updated; a recovery fine-tune (`lmforge finetune`) on
general text wins back part of the loss.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.compress.layerwise import LinearInputs, walk_blocks
from lmforge.model.layers.mlp import MLP
from lmforge.model.transformer import Transformer

STRUCTURES: tuple[str, ...] = ("channels", "heads", "layers")
CHANNEL_MULTIPLE = 64


class StructureError(ValueError):
    """A structured pruning this model cannot take."""


@dataclass
class ShrinkReport:
    structure: str
    fraction: float
    parameters_before: int
    parameters_after: int
    kept: str  # what the model keeps, in words
    calibration_tokens: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        return (f"{self.structure}: removed {self.fraction:.0%}, keeps {self.kept}; parameters "
                f"{self.parameters_before / 1e6:.1f}M -> {self.parameters_after / 1e6:.1f}M "
                f"({self.seconds:.0f} s)")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def _rows(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    return _linear(layer.weight[index], None if layer.bias is None else layer.bias[index])


def _columns(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    return _linear(layer.weight[:, index], layer.bias)


def channel_scores(mlp: MLP, down_inputs: LinearInputs) -> torch.Tensor:
    """||h_c|| * ||W_down[:, c]|| for every hidden channel c."""
    return down_inputs.sq_sum.sqrt() * mlp.down_proj.weight.float().norm(dim=0)


def shrink_channels(mlp: MLP, keep: torch.Tensor) -> None:
    """Keep hidden channels `keep` (sorted) of an MLP, in place."""
    if mlp.kind == "swiglu":
        mlp.gate_proj = _rows(mlp.gate_proj, keep)
    mlp.up_proj = _rows(mlp.up_proj, keep)
    mlp.down_proj = _columns(mlp.down_proj, keep)


def group_scores(attn: nn.Module, o_inputs: LinearInputs) -> torch.Tensor:
    """Per key/value group: the sum over its query heads of ||head output|| * ||W_o[:, head columns]||."""
    hd, heads, groups = attn.head_dim, attn.n_heads, attn.n_kv_heads
    activation = o_inputs.sq_sum.view(heads, hd).sum(-1).sqrt()
    weight = attn.o_proj.weight.float().view(-1, heads, hd).square().sum(dim=(0, 2)).sqrt()
    return (activation * weight).view(groups, heads // groups).sum(-1)


def shrink_heads(attn: nn.Module, keep_groups: torch.Tensor) -> None:
    """Keep key/value groups `keep_groups` (sorted) and their query heads, in place."""
    hd, per_group = attn.head_dim, attn.n_heads // attn.n_kv_heads
    kv_rows = (keep_groups[:, None] * hd + torch.arange(hd)).reshape(-1)
    q_heads = (keep_groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    attn.q_proj, attn.o_proj = _rows(attn.q_proj, q_rows), _columns(attn.o_proj, q_rows)
    attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_rows), _rows(attn.v_proj, kv_rows)
    attn.n_heads, attn.n_kv_heads = len(q_heads), len(keep_groups)


@torch.no_grad()
def block_influence(model: Transformer, calibration: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """1 - mean cosine(x_in, x_out) of every block over the calibration tokens (ShortGPT)."""
    total = torch.zeros(len(model.blocks))
    count = 0

    def hook(index):
        def record(module, args, output):
            x_in, x_out = args[0].float(), output[0].float()
            total[index] += (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum()
        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start:start + batch_size]
            model(batch)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return total / count


def _keep_best(model: Transformer, calibration: torch.Tensor, reads: str, score, shrink, keep: int,
               batch_size: int, progress) -> None:
    """Walk the blocks; in each, score its parts from the inputs layer `reads` saw and keep the best
    `keep` of them (in their original order)."""
    def visit(index, block, inputs):
        shrink(block, score(block, inputs[reads]).topk(keep).indices.sort().values)
        inputs.clear()

    walk_blocks(model, calibration, visit, xtx=False, batch_size=batch_size, progress=progress)


def _rebuilt(model: Transformer, config, blocks: list[int] | None = None) -> Transformer:
    """A fresh `Transformer` of `config` holding `model`'s (shrunk) tensors; `blocks` renumbers layers."""
    state = model.state_dict()
    if blocks is not None:
        renamed = {}
        for key, tensor in state.items():
            if key.startswith("blocks."):
                _, index, rest = key.split(".", 2)
                if int(index) in blocks:
                    renamed[f"blocks.{blocks.index(int(index))}.{rest}"] = tensor
            else:
                renamed[key] = tensor
        state = renamed
    device = next(model.parameters()).device
    return Transformer.from_state_dict(config, state, device=device).eval().requires_grad_(False)


@torch.no_grad()
def shrink_model(model: Transformer, structure: str, fraction: float, calibration: torch.Tensor, *,
                 batch_size: int = 8, progress=None) -> tuple[Transformer, ShrinkReport]:
    """A smaller model without `fraction` of `model`'s MLP channels, attention groups or blocks."""
    config = model.config
    if structure not in STRUCTURES:
        raise StructureError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    if not 0 < fraction < 1:
        raise StructureError(f"the fraction to remove must be between 0 and 1, got {fraction}")
    before = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    model.requires_grad_(False)
    if structure == "layers":
        drop = round(config.n_layers * fraction)
        if not 0 < drop < config.n_layers:
            raise StructureError(f"removing {fraction:.0%} of {config.n_layers} blocks leaves "
                                 f"{config.n_layers - drop}: nothing or everything")
        influence = block_influence(model, calibration, batch_size)
        keep = sorted(influence.topk(config.n_layers - drop).indices.tolist())
        new = _rebuilt(model, dataclasses.replace(config, n_layers=len(keep)), keep)
        kept = f"blocks {keep}"
    elif structure == "channels":
        if config.n_experts:
            raise StructureError("channel pruning needs dense MLPs; this model has mixture-of-experts layers")
        width = max(CHANNEL_MULTIPLE,
                    round(config.d_ff * (1 - fraction) / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE)
        if width >= config.d_ff:
            raise StructureError(f"removing {fraction:.0%} of {config.d_ff} channels, rounded to a multiple "
                                 f"of {CHANNEL_MULTIPLE}, removes nothing")

        _keep_best(model, calibration, "mlp.down_proj", lambda b, seen: channel_scores(b.mlp, seen),
                   lambda b, keep: shrink_channels(b.mlp, keep), width, batch_size, progress)
        new = _rebuilt(model, dataclasses.replace(config, d_ff=width))
        kept = f"{width} of {config.d_ff} MLP channels in every block"
    else:
        if config.position == "alibi":
            raise StructureError("head pruning would change ALiBi's per-head slopes; prune channels or "
                                 "layers")
        groups = config.kv_heads
        keep_groups = round(groups * (1 - fraction))
        if not 0 < keep_groups < groups:
            raise StructureError(f"removing {fraction:.0%} of {groups} key/value head groups keeps "
                                 f"{keep_groups}: nothing or everything")

        head_dim = config.dim_per_head
        _keep_best(model, calibration, "attn.o_proj", lambda b, seen: group_scores(b.attn, seen),
                   lambda b, keep: shrink_heads(b.attn, keep), keep_groups, batch_size, progress)
        per_group = config.n_heads // groups
        new = _rebuilt(model, dataclasses.replace(config, n_heads=keep_groups * per_group,
                                                  n_kv_heads=keep_groups, head_dim=head_dim))
        kept = f"{keep_groups} of {groups} key/value head groups ({keep_groups * per_group} query heads)"
    report = ShrinkReport(structure, fraction, before, sum(p.numel() for p in new.parameters()), kept,
                          calibration.numel(), time.perf_counter() - started)
    return new, report
