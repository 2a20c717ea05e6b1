"""Linear layers whose bf16 autocast stays fast on CPUs without bfloat16 arithmetic.

Under `torch.autocast("cpu", dtype=torch.bfloat16)` a matmul rounds its inputs to bf16,
multiplies, sums in fp32 and rounds the result to bf16. CPUs with AVX-512 BF16 or AMX do
this in hardware through oneDNN. On the others (AVX2-only x86, for one) PyTorch falls back
to a generic loop that runs at 0.6-8 GFLOP/s where its fp32 GEMM runs at 50: a GPT-2 LM
head's backward alone took minutes. There `linear` performs the same computation on the
fp32 GEMM: inputs rounded to bf16 and widened back (exactly: every bf16 is an fp32), an
fp32 product and sum, the result rounded to bf16. That is what the bf16 kernels compute,
up to the order of the sum. Gradients flow back through the same roundings, so they are
bf16 exactly where autocast makes them bf16. Everywhere else `linear` is `F.linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """PyTorch's own test for handing CPU bf16 matmuls to oneDNN (AVX-512 or AMX, or Arm's BF16)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_through_fp32(x: torch.Tensor) -> bool:
    """Is `x` about to be multiplied in bf16 on a CPU that has only the slow bf16 fallback?"""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not cpu_has_bf16_matmul())


def _bf16_values(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with CPU bf16 autocast computed on the fp32 GEMM where the CPU lacks bf16 (see above)."""
    if not bf16_through_fp32(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        out = F.linear(_bf16_values(x), _bf16_values(weight), None if bias is None else _bf16_values(bias))
    return out.to(torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
