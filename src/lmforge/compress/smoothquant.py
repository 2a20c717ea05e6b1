"""SmoothQuant: W8A8, int8 weights *and* int8 activations, made accurate by moving the outliers.

Rounding activations to 8 bits is hard for one reason: a few input channels of a layer
carry values 10-100x larger than the rest, on every token. A per-token int8 scale must
cover that channel, so every other channel of the token gets a handful of levels. The
weights, by contrast, are flat and round easily. SmoothQuant trades difficulty between
the two: divide input channel j of the activations by s_j and multiply the weights' input
column j by s_j, which leaves the float function unchanged (x W^T = (x / s)(W s)^T), with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so that after the move both sides have ranges of about max|X_j|^alpha max|W_j|^(1-alpha).
alpha = 0.5 splits the difficulty evenly (the paper's default); larger alpha moves more of
it into the weights. `alpha=None` searches alpha in 0, 0.1, ..., 1 for each group of layers,
keeping the one whose W8A8 output on calibration rows is closest to the float output
(as AWQ searches its own exponent).

The division is folded into whatever produced the activations, exactly as AWQ folds its
scales (`awq.apply_scales`, the same producer/consumer pairs: a norm's gain for q/k/v and
gate/up, up's rows for down, v's rows for o without grouped-query attention), so the
smoothed model has no extra operation. Then every linear layer of every block becomes an
`Int8ActLinear`: weights int8 per output channel, activations rounded to int8 per token
("dynamic") or with one scale per layer from the calibration maximum ("static").
"""

from __future__ import annotations

import torch

from lmforge.compress.awq import apply_scales, group_weight, scale_groups
from lmforge.compress.grid import Grid
from lmforge.compress.layerwise import LinearInputs, linear_layers, set_module
from lmforge.infer.quant import ActivationScales, Int8ActLinear
from lmforge.model.transformer import Block

ALPHA_GRID = 11  # 0, 0.1, ..., 1
SEARCH_ROWS = 512
INT8 = Grid(8)


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); channels that never fire, or have no weight, keep 1."""
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def fake_w8a8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T as W8A8 computes it (per-token int8 x, per-channel int8 W), in float."""
    x_scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    x_q = torch.round(x / x_scale).clamp(-127, 127) * x_scale
    return x_q @ INT8.round(weight, *INT8.fit(weight)).T


def search_alpha(weight: torch.Tensor, x: torch.Tensor, x_max: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(alpha, s) minimising the W8A8 output error on the sample rows `x` of the group's inputs."""
    reference = x @ weight.T
    w_max = weight.abs().amax(dim=0)
    best = (0.5, smoothing_scales(x_max, w_max, 0.5), float("inf"))
    for k in range(ALPHA_GRID):
        alpha = k / (ALPHA_GRID - 1)
        s = smoothing_scales(x_max, w_max, alpha)
        error = float((fake_w8a8(x / s, weight * s) - reference).square().mean())
        if error < best[2]:
            best = (alpha, s, error)
    return best[0], best[1]


@torch.no_grad()
def smooth_block(block: Block, inputs: dict[str, LinearInputs], alpha: float | None) -> dict[str, float]:
    """Move activation outliers of one block into its weights, in place (the float function is
    unchanged); the recorded input statistics are divided by the same scales. Returns the alpha
    used per group, named by its first layer."""
    alphas: dict[str, float] = {}
    for group in scale_groups(block):
        seen = inputs[group.layers[0]]
        weight = group_weight(block, group.layers)
        if alpha is None:
            chosen, s = search_alpha(weight, seen.sample_rows()[:SEARCH_ROWS], seen.abs_max)
        else:
            chosen, s = alpha, smoothing_scales(seen.abs_max, weight.abs().amax(dim=0), alpha)
        apply_scales(block, group, s)
        alphas[group.layers[0]] = chosen
        for name in group.layers:
            inputs[name].abs_max = inputs[name].abs_max / s
            inputs[name].samples = [r / s for r in inputs[name].samples]
    return alphas


@torch.no_grad()
def w8a8_block(block: Block, inputs: dict[str, LinearInputs], activations: ActivationScales) -> int:
    """Replace every linear layer of the block by an `Int8ActLinear`; static activation scales are
    each layer's calibration maximum / 127. Returns how many layers."""
    layers = linear_layers(block)
    for name, layer in layers.items():
        codes, step, _offset = INT8.rtn(layer.weight)
        act_scale = float(inputs[name].abs_max.max()) / 127 if activations == "static" else 0.0
        replacement = Int8ActLinear(codes.to(torch.int8), step.reshape(-1), layer.bias,
                                    activations=activations, act_scale=act_scale)
        set_module(block, name, replacement.to(layer.weight.device))
    return len(layers)
