"""LoRA: train a low-rank change to a frozen weight instead of the weight itself.

Fine-tuning changes a d_out x d_in matrix W by some dW. Hu et al. (2021) observed that
the dW of fine-tuning has low intrinsic rank, so it can be written as B A with A of
shape r x d_in and B of shape d_out x r, r << d: a layer then computes

    y = W x + (alpha / r) * B (A x)

and only A and B train: r (d_in + d_out) numbers instead of d_in d_out (for SmolLM2's
576 x 576 attention projections at r = 16, 18,432 instead of 331,776).

- **Why B starts at zero.** A is random (Kaiming-uniform, as PEFT) and B is zero, so
  B A = 0 and the adapted model starts as exactly the base model; the first gradient
  step moves B (dL/dB = dL/dy (A x)^T is not zero because A is not). Were both random,
  training would start from a damaged model; were both zero, no gradient would flow.
- **The alpha / r scale.** The update's size then depends on r; dividing by r keeps it
  comparable across ranks, so alpha (and the learning rate) need not be retuned when r
  changes. rsLoRA (Kalajdzievski 2023) divides by sqrt(r) instead, which keeps the
  update's variance steady as r grows and lets large ranks actually learn more.
- **DoRA** (Liu et al. 2024) splits the adapted weight into a direction and a length:
  W' = m * (W + s B A) / ||W + s B A||, the norm taken over each output row, m a trained
  vector that starts at ||W||. Only the direction goes through the low-rank update; the
  norm is treated as a constant in the backward pass (the paper's section 4.3).
- **Merging.** After training, W + s B A (or DoRA's W') is one ordinary matrix: inference
  costs nothing extra. Here the base weight is never modified: `merge()` computes the
  merged matrix once and uses it, `unmerge()` drops it, so unmerging is exact.

Module and tensor names follow PEFT (`lora_A.weight`, `lora_B.weight`,
`lora_magnitude_vector`) so adapters move between lmforge and `peft` (tune/peft_io.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers.linear import linear

# lmforge's names of the linear layers inside a block, and where "all-linear" reaches
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """A LoRA setting that cannot apply to this model (no such module, bad rank)."""


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # "all-linear" (every linear layer of every block; never the LM head) or module names
    # such as [q_proj, v_proj]
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row
    layers: list[int] = field(default_factory=list)  # only these blocks (default: all)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate(self) -> None:
        if self.r < 1:
            raise LoRAError(f"lora.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]


class LoRALinear(nn.Module):
    """`base` (frozen, untouched) plus a trainable low-rank update; a drop-in for the linear it wraps."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        if config.r > min(in_features, out_features):
            raise LoRAError(f"lora.r ({config.r}) exceeds the layer's smaller side "
                            f"({min(in_features, out_features)})")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = next(base.parameters(), torch.empty(0)).device
        self.lora_A = nn.Linear(in_features, config.r, bias=False, device=device)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if config.dora:
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(self._adapted_weight().norm(dim=1))
        self._merged: torch.Tensor | None = None

    # ------------------------------------------------------------------ weights
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a dense matrix (an NF4 base dequantizes it on each call)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """s B A: what LoRA adds to the weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _adapted_weight(self) -> torch.Tensor:
        return self.base_weight().float() + self.delta_weight().float()

    def merged_weight(self) -> torch.Tensor:
        """The one matrix this layer computes with (LoRA added; for DoRA rescaled per row)."""
        weight = self._adapted_weight()
        if self.lora_magnitude_vector is not None:
            weight = weight * (self.lora_magnitude_vector / weight.norm(dim=1)).unsqueeze(1)
        return weight.to(self.base_weight().dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    # ------------------------------------------------------------------ merging
    def merge(self) -> None:
        """Compute with the merged matrix from now on (inference); the base weight stays as it was."""
        with torch.no_grad():
            self._merged = self.merged_weight()

    def unmerge(self) -> None:
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is not None:
            return linear(x, self._merged.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        result = self.base(x)
        dropped = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling
        if self.lora_magnitude_vector is None:
            return result + update
        # DoRA: result + (m / ||W + sBA|| - 1) W x + (m / ||W + sBA||) s B A x, the norm a constant
        with torch.no_grad():
            norm = (self.base_weight().float() + self.delta_weight().float()).norm(dim=1).to(x.dtype)
        scale = (self.lora_magnitude_vector / norm).to(x.dtype)
        if dropped is x:  # no dropout: W x is already in `result`, as peft reuses its base_result
            base_part = result if self.bias is None else result - self.bias.to(x.dtype)
        else:
            base_part = F.linear(dropped, self.base_weight().to(x.dtype))
        return result + (scale - 1) * base_part + scale * update

    def extra_repr(self) -> str:
        kind = "DoRA" if self.lora_magnitude_vector is not None else "LoRA"
        return f"{kind} r={self.lora_A.out_features}, scaling={self.scaling:g}, merged={self.merged}"


# ---------------------------------------------------------------------------------- model surgery
def target_module_names(model: nn.Module, targets: str | Sequence[str],
                        layers: Sequence[int] = ()) -> list[str]:
    """The names of the linear layers inside the blocks that `targets` selects (never the LM head).

    `targets` is "all-linear" or short names ("q_proj") or full names ("blocks.0.attn.q_proj").
    """
    candidates = [name for name, module in model.named_modules()
                  if name.startswith("blocks.") and _is_linear(module)
                  and name.rsplit(".", 1)[-1] in ATTENTION_LINEARS + MLP_LINEARS]
    if layers:
        candidates = [n for n in candidates if int(n.split(".")[1]) in set(layers)]
    if targets == "all-linear":
        chosen = candidates
    else:
        wanted = set(targets)
        chosen = [n for n in candidates if n in wanted or n.rsplit(".", 1)[-1] in wanted]
        unknown = sorted(t for t in wanted
                         if not any(n == t or n.rsplit(".", 1)[-1] == t for n in candidates))
        if unknown:
            known = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise LoRAError(f"lora.target_modules: no linear layer named {', '.join(unknown)} in this model "
                            f"(it has {', '.join(known)}, or use all-linear)")
    if not chosen:
        raise LoRAError("lora.target_modules selects no layer of this model")
    return chosen


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a frozen stand-in for one (an NF4 layer): anything with in/out features."""
    if isinstance(module, nn.Linear):
        return True
    features = hasattr(module, "in_features") and hasattr(module, "out_features")
    return features and not isinstance(module, LoRALinear)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap the target linears in `LoRALinear`; the names of the wrapped layers."""
    config.validate()
    names = target_module_names(model, config.target_modules, config.layers)
    freeze(model)
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), config))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def replace_with_linear(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put a plain `nn.Linear` holding `weight` (and `bias`) where module `name` was: a merged adapter."""
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    plain.weight.copy_(weight)
    if bias is not None:
        plain.bias.copy_(bias)
    replace_module(model, name, plain)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain linear holding its merged weight (for saving, export)."""
    for name, layer in lora_layers(model).items():
        replace_with_linear(model, name, layer.merged_weight(), layer.bias)
    return model
