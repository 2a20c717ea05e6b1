"""AWQ: activation-aware scaling and clipping before round-to-nearest.

A few input channels carry much larger activations than the rest, and the weights that
multiply them matter most to the output. AWQ protects them without mixed precision:
multiply input channel j of a layer's weight by s_j > 1 and divide the activation by s_j
(folded into whatever produced it: a norm's gain, or the rows of the previous linear),
which leaves the float model's function unchanged. After rounding, the error on channel
j shrinks by about s_j relative to the output, because the group's step barely moves
when one column grows. The scales are s = mean|x|^alpha (normalised), with alpha in
[0, 1) chosen by a grid search that measures the layers' output error on calibration
inputs. Then, per group of weights, a clipping search shrinks the range [-max, max] by
up to 45% (AWQ's grid: steps of 5%, below 50%) where that lowers the output error
(outliers in the weights waste levels).
The weights are finally rounded to nearest on the grid: AWQ changes *what* is rounded.

The scalable pairs, in a pre-norm block (as in AWQ's reference code):
- attn_norm -> q, k, v   (the norm's gain, and bias for LayerNorm, divided by s)
- mlp_norm -> gate, up
- up -> down             (SwiGLU: silu(gate) * (up / s) = hidden / s); not for GELU MLPs
- v -> o                 only without grouped-query attention (v's rows are o's inputs)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.compress.grid import Grid, GridError
from lmforge.compress.layerwise import LinearInputs
from lmforge.model.layers.mlp import MLP
from lmforge.model.transformer import Block

SCALE_GRID = 20  # alphas 0, 0.05, ..., 0.95
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_SAMPLES = 512  # input rows the clipping search replays (AWQ's reference uses 512 tokens)


@dataclass(frozen=True)
class ScaleGroup:
    previous: str  # the module whose output the layers read: a norm, or a linear layer
    layers: tuple[str, ...]


def scale_groups(block: Block) -> list[ScaleGroup]:
    if not isinstance(block.mlp, MLP):
        raise GridError("AWQ scales dense MLPs; this model has mixture-of-experts layers (use gptq or rtn)")
    groups = [ScaleGroup("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj"))]
    if block.mlp.kind == "swiglu":
        groups += [ScaleGroup("mlp_norm", ("mlp.gate_proj", "mlp.up_proj")),
                   ScaleGroup("mlp.up_proj", ("mlp.down_proj",))]
    else:
        groups.append(ScaleGroup("mlp_norm", ("mlp.up_proj",)))
    if block.attn.n_heads == block.attn.n_kv_heads:
        groups.append(ScaleGroup("attn.v_proj", ("attn.o_proj",)))
    return groups


def group_weight(block: Block, names: tuple[str, ...]) -> torch.Tensor:
    """The weights of layers that read the same input, stacked [sum of outputs, in] in fp32."""
    return torch.cat([block.get_submodule(n).weight.detach().float() for n in names])


def search_scales(weight: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor,
                  grid: Grid) -> tuple[torch.Tensor, float, float]:
    """(s, alpha, error): the per-input scales minimising ||x W^T - (x / s) Q(W s)^T||^2 on samples `x`."""
    reference = x @ weight.T
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    for k in range(SCALE_GRID):
        alpha = k / SCALE_GRID
        s = x_mean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        codes, step, offset = grid.rtn(weight * s)
        error = float(((x @ (grid.dequantize(codes, step, offset) / s).T) - reference).square().mean())
        if error < best[2]:
            best = (s, alpha, error)
    return best


def apply_scales(block: Block, group: ScaleGroup, s: torch.Tensor) -> None:
    """Layers' input channels times s, the producer's outputs divided by s: the same function."""
    previous = block.get_submodule(group.previous)
    with torch.no_grad():
        if isinstance(previous, nn.Linear):
            previous.weight.div_(s[:, None].to(previous.weight.dtype))
            if previous.bias is not None:
                previous.bias.div_(s.to(previous.bias.dtype))
        else:  # RMSNorm or LayerNorm: y = normalised(x) * gain (+ bias)
            previous.weight.div_(s.to(previous.weight.dtype))
            if getattr(previous, "bias", None) is not None:
                previous.bias.div_(s.to(previous.bias.dtype))
        for name in group.layers:
            layer = block.get_submodule(name)
            layer.weight.mul_(s[None, :].to(layer.weight.dtype))


def search_clip(weight: torch.Tensor, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """max|w| per (row, group) after the search: the range each group is clipped to before rounding."""
    out_features, in_features = weight.shape
    g = grid.group_of(in_features)
    w = weight.float().view(out_features, -1, g)
    xg = x.float().view(x.shape[0], -1, g)  # [n, groups, g]
    reference = torch.einsum("ngk,ogk->nog", xg, w)
    top = w.abs().amax(-1)  # [out, groups]
    best_top, best_error = top.clone(), torch.full_like(top, float("inf"))
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        limit = top * (1 - i / CLIP_GRID)
        clipped = torch.maximum(torch.minimum(w, limit[..., None]), -limit[..., None])
        step, offset = grid.fit(clipped.reshape(-1, g))
        rounded = grid.round(clipped.reshape(-1, g), step, offset).view_as(w)
        error = (torch.einsum("ngk,ogk->nog", xg, rounded) - reference).square().mean(0)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_top = torch.where(better, limit, best_top)
    return best_top


@torch.no_grad()
def awq_block(block: Block, inputs: dict[str, LinearInputs], grid: Grid) -> dict[str, float]:
    """Scale and clip one block's weights in place (still float: rounding comes after); returns the
    alpha chosen for each group, named by its first layer."""
    alphas: dict[str, float] = {}
    for group in scale_groups(block):
        seen = inputs[group.layers[0]]
        x = seen.sample_rows()
        weight = group_weight(block, group.layers)
        s, alpha, _error = search_scales(weight, x, seen.abs_sum / seen.tokens, grid)
        apply_scales(block, group, s)
        alphas[group.layers[0]] = alpha
        for name in group.layers:  # the recorded inputs were before scaling: divide them too
            inputs[name].samples = [r / s for r in inputs[name].samples]
    if grid.symmetric:  # 8 bits per channel: clipping a whole row's range is not worth it
        return alphas
    for name, seen in inputs.items():
        layer = block.get_submodule(name)
        x = seen.sample_rows()[:CLIP_SAMPLES]
        top = search_clip(layer.weight, x, grid)
        w = layer.weight.view(layer.out_features, top.shape[1], -1)
        w.copy_(torch.maximum(torch.minimum(w, top[..., None]), -top[..., None]))
    return alphas
