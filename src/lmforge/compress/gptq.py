"""GPTQ: round a layer's weights one input column at a time, pushing each rounding error onto the
columns not yet rounded, so that the layer's *outputs* on real inputs change as little as possible.

Rounding to nearest minimises the error of each weight; what matters is the error of
the outputs, ||X W^T - X Q^T||^2 over calibration inputs X. For one output row w its
Hessian is H = 2 X^T X (the same for every row). Optimal Brain Quantization: after
rounding weight j to q_j, the best correction of the remaining weights F is

    delta_F = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, F}

and GPTQ's observations make that fast: rounding the columns in one fixed order for all
rows lets every row share H^-1, and the sequence of inverses with columns removed is
read off the upper Cholesky factor U of H^-1 (row j of U, divided by U_jj, is the update
for column j). Updates are applied lazily in blocks of B columns (a rank-B matmul for the
rest of the matrix instead of one rank-1 update per column), which is what makes it
memory-bound-free and fast.

Details, as in the paper and its reference code:
- *damping*: H + lambda I with lambda = 1% of mean(diag H) keeps the Cholesky stable;
- *dead inputs* (diag H = 0: an input channel that was always 0) get H_jj = 1 and w_j = 0;
- *act-order*: columns in order of decreasing H_jj (the inputs with the largest
  activations first, while there are many columns left to absorb their errors);
- *groups*: each group of G inputs gets its own step and offset. Without act-order they
  are fitted when the walk reaches the group, on the weights as updated so far. With
  act-order the walk jumps between groups, so each group's step and offset are fitted
  before the walk on the original weights ("static groups"): the groups then stay
  contiguous runs of G inputs, which is the layout the engine's int4 layer stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.compress.grid import Grid, GridError


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [out, in]
    step: torch.Tensor  # [out, groups]
    offset: torch.Tensor  # [out, groups]
    loss: float  # sum over rows of sum_j (w_j - q_j)^2 / [H^-1]_jj / 2: GPTQ's own error estimate


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise GridError(f"the layer's input Hessian is not positive definite even with damping {damp}: "
                        f"raise --damp, or calibrate on more (and more varied) text")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float()


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False) -> GPTQResult:
    """Quantize `weight` [out, in] to `grid` given `hessian` [in, in] (2/n X^T X of its inputs)."""
    out_features, in_features = weight.shape
    g = grid.group_of(in_features)
    n_groups = in_features // g
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    step = w.new_zeros(out_features, n_groups)
    offset = w.new_zeros(out_features, n_groups)
    static = act_order or grid.symmetric  # per-channel 8 bits: one group, fitted up front
    if static:
        for j in range(n_groups):
            step[:, j], offset[:, j] = grid.fit(w[:, j * g:(j + 1) * g])
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_features)
    w, h = w[:, order], h[order][:, order]
    u = inverse_hessian_factor(h, damp)

    codes = torch.zeros_like(w)
    loss = torch.zeros(out_features)
    block = block_size if static else max(block_size // g, 1) * g  # a fitted group lies inside one block
    for b0 in range(0, in_features, block):
        b1 = min(b0 + block, in_features)
        w_block = w[:, b0:b1].clone()
        errors = torch.zeros_like(w_block)
        u_block = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            column = int(order[b0 + i])
            group = column // g
            if not static and column % g == 0:  # the walk enters a group: fit it on today's weights
                step[:, group], offset[:, group] = grid.fit(w_block[:, i:i + g])
            current = w_block[:, i]
            q = grid.codes(current, step[:, group], offset[:, group])
            codes[:, b0 + i] = q
            error = (current - (q * step[:, group] + offset[:, group])) / u_block[i, i]
            loss += error.square() / 2
            w_block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            errors[:, i] = error
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    inverse = torch.argsort(order)
    return GPTQResult(codes[:, inverse], step, offset, float(loss.sum()))
