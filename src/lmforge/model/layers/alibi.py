"""ALiBi: no position embeddings at all; attention scores get a penalty linear in distance.

Head h subtracts slope_h * (i - j) from the score of query i on key j. Slopes form a
geometric sequence so that some heads look far back and others only nearby.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The slopes of Press et al. (2022), including their rule for non-powers of two."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two_slopes(closest) + extra)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, H, T, S] additive bias: -slope * (query position - key position)."""
    distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).float()
    return -slopes.to(distance.device)[None, :, None, None] * distance
