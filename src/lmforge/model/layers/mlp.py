"""The feed-forward network of a block: expand, non-linearity, project back.

GPT-2: Linear(d, 4d) -> GELU -> Linear(4d, d). Llama: SwiGLU, a gated unit where
silu(gate(x)) multiplies up(x) elementwise. ReLU² (squared ReLU) is the cheap,
sparse variant used by modded-nanogpt and Primer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hidden, bias = config.d_model, config.d_ff, config.mlp_bias
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = Linear(d, hidden, bias=bias)
        self.up_proj = Linear(d, hidden, bias=bias)
        self.down_proj = Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        if self.kind == "swiglu":
            hidden = F.silu(self.gate_proj(x)) * up
        elif self.kind == "gelu_tanh":
            hidden = F.gelu(up, approximate="tanh")
        elif self.kind == "gelu":
            hidden = F.gelu(up)
        else:  # relu2
            hidden = F.relu(up).square()
        return self.down_proj(hidden)
