"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Llama and most modern models)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain.

    Cheaper than LayerNorm (no mean, no bias) and just as stable; computed in fp32
    because the mean of squares loses precision in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)
