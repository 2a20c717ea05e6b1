"""(IA)^3: fine-tune by rescaling activations with learned vectors (Liu et al. 2022).

"Infused Adapter by Inhibiting and Amplifying Inner Activations" trains three vectors
per block and nothing else: l_k and l_v rescale the attention's keys and values, l_ff
rescales the feed-forward layer's hidden activation before its output projection:

    k = l_k * (W_k x)        v = l_v * (W_v x)        y = W_down (l_ff * act(x))

(* elementwise). For SmolLM2-135M that is 30 x (192 + 192 + 1,536) = 57,600 numbers,
0.04% of the model; LoRA at r = 16 on the same three layers trains thirty times more (1.75M).

- **Why start at 1.** Every vector starts as ones, so each rescaling is the identity
  and the adapted model starts as exactly the base model; the gradient of a scale is
  the activation it multiplies (dL/dl = dL/dy * (W x) for a key or value), not zero, so
  training moves it from the first step.
- **Why it merges exactly.** Scaling a layer's outputs by l is scaling the rows of its
  weight, l * (W x) = (diag(l) W) x (and its bias, l * b); scaling its inputs is scaling
  the columns, W (l * x) = (W diag(l)) x (the bias is untouched). Either way the merged
  layer is one ordinary matrix: after training, inference costs nothing extra. As in
  tune/lora.py the base weight is never modified: `merge()` computes the merged matrix
  and uses it, `unmerge()` drops it.

The defaults are PEFT's for Llama-family models (target k_proj, v_proj, down_proj;
down_proj scaled on its input), and tensors keep PEFT's names and shapes (`ia3_l`,
(out, 1) for an output scale, (1, in) for an input scale), so adapters move between
lmforge and `peft` (tune/peft_io.py `save_ia3` / `load_ia3`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.model.layers.linear import linear
from lmforge.tune.lora import LoRAError, freeze, replace_module, replace_with_linear, target_module_names


class IA3Error(ValueError):
    """An (IA)^3 setting that cannot apply to this model."""


@dataclass
class IA3Config:
    # module names (short, as q_proj, or full, as blocks.0.attn.k_proj): whose outputs are rescaled ...
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # ... except these, whose inputs are (the feed-forward's output projections)
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    layers: list[int] = field(default_factory=list)  # only these blocks (default: all)

    def validate(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.feedforward_modules, str):
            self.feedforward_modules = [self.feedforward_modules]
        if not self.target_modules:
            raise IA3Error("ia3.target_modules is empty: name the layers to rescale (k_proj, v_proj, "
                           "down_proj)")
        stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if stray:
            raise IA3Error(f"ia3.feedforward_modules must be among ia3.target_modules; "
                           f"{', '.join(stray)} is not")

    def is_feedforward(self, name: str) -> bool:
        return name in self.feedforward_modules or name.rsplit(".", 1)[-1] in self.feedforward_modules


class IA3Linear(nn.Module):
    """`base` (frozen, untouched), its outputs (a feed-forward layer: its inputs) rescaled by `ia3_l`."""

    def __init__(self, base: nn.Module, *, feedforward: bool) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.is_feedforward = feedforward
        device = base.weight.device
        shape = (1, in_features) if feedforward else (out_features, 1)  # PEFT's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device))  # starts as the identity
        self._merged: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    # ------------------------------------------------------------------ merging
    def merged_weight(self) -> torch.Tensor:
        """diag(l) W for an output scale, W diag(l) for an input scale (`ia3_l`'s shape broadcasts so)."""
        weight = self.base.weight
        return (weight.float() * self.ia3_l.float()).to(weight.dtype)

    def merged_bias(self) -> torch.Tensor | None:
        """An output scale scales the bias too; an input scale leaves it."""
        if self.bias is None or self.is_feedforward:
            return self.bias
        return (self.bias.float() * self.ia3_l.float().flatten()).to(self.bias.dtype)

    def merge(self) -> None:
        """Compute with the merged matrix from now on (inference); the base weight stays as it was."""
        with torch.no_grad():
            self._merged = (self.merged_weight(), self.merged_bias())

    def unmerge(self) -> None:
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is not None:
            weight, bias = self._merged
            return linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        scale = self.ia3_l.flatten().to(x.dtype)
        if self.is_feedforward:
            return self.base(x * scale)
        return self.base(x) * scale

    def extra_repr(self) -> str:
        return f"(IA)^3 on the {'input' if self.is_feedforward else 'output'}, merged={self.merged}"


def add_ia3(model: nn.Module, config: IA3Config) -> list[str]:
    """Freeze `model` and wrap the target linears in `IA3Linear`; the names of the wrapped layers."""
    config.validate()
    try:
        names = target_module_names(model, config.target_modules, config.layers)
    except LoRAError as err:  # the same selection rules as LoRA's, reported under this method's name
        raise IA3Error(str(err).replace("lora.", "ia3.")) from err
    freeze(model)
    for name in names:
        layer = IA3Linear(model.get_submodule(name), feedforward=config.is_feedforward(name))
        replace_module(model, name, layer)
    return names


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


@torch.no_grad()
def merge_ia3(model: nn.Module) -> nn.Module:
    """Replace every `IA3Linear` by a plain linear holding its merged weight (for inference, export)."""
    for name, layer in ia3_layers(model).items():
        replace_with_linear(model, name, layer.merged_weight(), layer.merged_bias())
    return model
