"""Bottleneck adapters: a small residual network after each sublayer (Houlsby et al. 2019).

Houlsby et al. insert, after each sublayer of every block (attention, then the MLP), a
module that projects the sublayer's output h down to r dimensions, applies a
nonlinearity and projects back up, added to h itself:

    adapter(h) = h + W_up act(W_down h + b_down) + b_up,        block: x + adapter(sublayer(norm(x)))

It sits between the sublayer's output and the residual add, so the frozen model's
residual stream is changed only through it. Each adapter trains 2 r d + r + d numbers;
for SmolLM2-135M (d = 576) at r = 16, 30 x 2 x 19,024 = 1.14M, 0.8% of the model.

- **Why up starts at zero.** W_up = 0 and b_up = 0 make each adapter the identity,
  adapter(h) = h, so the adapted model starts as exactly the base model (Houlsby et al.
  initialise near the identity for the same reason: a random residual branch would
  start training from a damaged model). The first step moves W_up (its gradient,
  dL/dy act(W_down h + b_down)^T, is not zero because W_down is random); W_down starts
  learning from the second step, once W_up is not zero: LoRA's B = 0 argument again.
- **No merging.** The nonlinearity between the two projections means the adapter does
  not fold into the weights (unlike LoRA or (IA)^3): inference runs it as two small
  matmuls per sublayer, and the inference runner applies them in its PyTorch path
  (its fused C decode kernel knows nothing of them and is turned off).

How the adapters reach the model: each block gets `attn_adapter` and `mlp_adapter`
submodules (parameters `blocks.0.attn_adapter.down.weight`, ...), and a forward hook on
`block.attn` and `block.mlp` passes the sublayer's output through them, so the model's
own code and parameter names stay unchanged. peft has no such method, so these are
saved as an lmforge adapter folder (peft_type "LMFORGE_BOTTLENECK", tune/peft_io.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.tune.lora import freeze

SUBLAYERS = ("attn", "mlp")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckError(ValueError):
    """A bottleneck-adapter setting that cannot apply to this model."""


@dataclass
class BottleneckConfig:
    r: int = 16  # the bottleneck's width
    activation: str = "gelu"  # relu, gelu, silu or tanh
    dropout: float = 0.0  # on the bottleneck's activations, while training
    sublayers: list[str] = field(default_factory=lambda: list(SUBLAYERS))  # attn and/or mlp
    layers: list[int] = field(default_factory=list)  # only these blocks (default: all)

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise BottleneckError(f"adapter.r must be a whole number >= 1, got {self.r!r}")
        if self.activation not in ACTIVATIONS:
            raise BottleneckError(f"adapter.activation must be one of {', '.join(ACTIVATIONS)}, "
                                  f"got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise BottleneckError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.sublayers, str):
            self.sublayers = [self.sublayers]
        unknown = sorted(set(self.sublayers) - set(SUBLAYERS))
        if unknown or not self.sublayers:
            raise BottleneckError(f"adapter.sublayers must name attn and/or mlp, got {self.sublayers}")


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(h))): a residual bottleneck that starts as the identity."""

    def __init__(self, d_model: int, config: BottleneckConfig, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.r > d_model:
            raise BottleneckError(f"adapter.r ({config.r}) exceeds the model's width ({d_model})")
        self.down = nn.Linear(d_model, config.r, device=device)
        self.up = nn.Linear(config.r, d_model, device=device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # nn.Linear's own init, as LoRA's A
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(ACTIVATIONS[self.activation](self.down(h))))

    def extra_repr(self) -> str:
        return f"r={self.down.out_features}, activation={self.activation}"


def _through_adapter(sublayer: nn.Module, args: tuple, output):
    """Forward hook on `block.attn` / `block.mlp`: the sublayer's output goes through its adapter
    (an MoE's (output, aux loss) pair keeps its aux loss)."""
    adapter = sublayer._lmforge_block_adapter  # set by add_bottleneck
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def add_bottleneck(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Freeze `model` and insert an adapter after the chosen sublayers; the names of the adapters."""
    config.validate()
    n_layers = len(model.blocks)
    bad = sorted(i for i in config.layers if not 0 <= i < n_layers)
    if bad:
        raise BottleneckError(f"adapter.layers: the model has blocks 0..{n_layers - 1}, not {bad}")
    freeze(model)
    device = model.embed.weight.device
    names = []
    for i, block in enumerate(model.blocks):
        if config.layers and i not in config.layers:
            continue
        for sublayer in config.sublayers:
            name = f"{sublayer}_adapter"
            if hasattr(block, name):
                raise BottleneckError(f"blocks.{i} already has an {name}")
            adapter = BottleneckAdapter(model.config.d_model, config, device=device)
            block.add_module(name, adapter)
            target = getattr(block, sublayer)
            # a plain attribute, not a submodule: the parameters are named once, under the block (the
            # hook finds the adapter through the sublayer it is called with, so a deepcopy stays right)
            object.__setattr__(target, "_lmforge_block_adapter", adapter)
            target.register_forward_hook(_through_adapter)
            names.append(f"blocks.{i}.{name}")
    return names


def bottleneck_adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
