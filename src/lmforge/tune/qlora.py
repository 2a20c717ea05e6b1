"""QLoRA: LoRA over a base whose linear layers are stored in NF4 (Dettmers et al. 2023).

The frozen base is the memory: 4 bytes a weight in fp32. QLoRA stores it in NF4 with
double-quantized scales (tune/nf4.py, 4.127 bits a weight, 12.9% of fp32) and
dequantizes each layer's weight just before its matmul; gradients flow through the
dequantized weight to the input (the LoRA matrices upstream need them) but the NF4 bytes
themselves never change. LoRA's A and B stay in full precision and train as usual.

What a 4-bit base costs is measured, not assumed: the same fine-tuning with an fp32 and
an NF4 base gives the held-out losses in docs/finetuning.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.tune.lora import LoRAConfig, add_lora, replace_module, target_module_names
from lmforge.tune.nf4 import NF4Tensor, quantize_nf4


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight lives in NF4; `weight` dequantizes it on demand.

    The NF4 bytes are buffers, so `.to(device)` moves them and a state dict holds them.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        stored = quantize_nf4(linear.weight.detach())
        for name in ("packed", "absmax_codes", "absmax_scales", "offset"):
            self.register_buffer(name, getattr(stored, name))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                   requires_grad=False)

    @property
    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax_codes, self.absmax_scales, self.offset,
                         (self.out_features, self.in_features), self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.nf4.dequantize(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Matmul.apply(x, self, bias)

    def nbytes(self) -> int:
        return self.nf4.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4"


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 when needed, and not kept in between.

    Autograd would save the dequantized W (4 bytes a weight) for the backward pass of every
    layer, holding the whole model in fp32 at the peak of a step and undoing what NF4 saved.
    W is frozen, so the backward needs it only for dL/dx = dL/dy W: it is dequantized again
    there, a second gather-and-scale for each layer (cheap next to the matmul)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad_x = grad @ ctx.layer.weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def quantize_base(model: nn.Module, names: list[str]) -> None:
    """Replace these linear layers by frozen NF4 copies."""
    for name in names:
        replace_module(model, name, NF4Linear(model.get_submodule(name)))


def add_qlora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """QLoRA: every linear layer of the blocks to NF4, then LoRA on the targeted ones."""
    config.validate()
    quantize_base(model, target_module_names(model, "all-linear", config.layers))
    return add_lora(model, config)


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the NF4 layers take as stored, bytes the same weights take in fp32)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.nbytes() for m in layers), sum(4 * m.in_features * m.out_features for m in layers)
