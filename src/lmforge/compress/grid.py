"""The number grids weights are rounded to, and the engine layers that store them.

Every method in `lmforge.compress` ends the same way: each weight w becomes
code * step + offset, with integer codes. Only where the steps and offsets come from,
and which codes are picked, differ (round-to-nearest, GPTQ's error feedback, AWQ's scaled
and clipped weights). Two grids, matching the engine's two quantized layers:

- **8 bits, symmetric, per output channel** (`Int8Linear`): step = max|w_row| / 127,
  offset 0, codes in -127..127.
- **2-4 bits, asymmetric, per group of G inputs** (`Int4Linear`, GGUF Q4_1's layout):
  step = (max - min) / (2^b - 1), offset = min, codes in 0..2^b-1. Steps and offsets are
  stored in fp16, so they are rounded to fp16 *before* the codes are chosen: the codes are
  then the best ones for the numbers actually stored. A 3-bit grid is held in the 4-bit
  layer (codes 0..7): the same engine kernels run it; it saves no memory over 4 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.infer.quant import Int4Linear, Int8Linear, QuantizedLinear


class GridError(ValueError):
    """A grid the engine cannot store (bits, group size against the layer's inputs)."""


@dataclass(frozen=True)
class Grid:
    bits: int  # 8, or 2..4
    group_size: int = 64  # inputs sharing a step and offset (the 2-4 bit grids; 8 bits is per channel)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise GridError(f"bits must be 8, 4, 3 or 2, got {self.bits}")
        if self.bits < 8 and (self.group_size < 32 or self.group_size % 32):
            raise GridError(f"the group size must be a multiple of 32 (the engine's int4 kernels read "
                            f"32 inputs at a time), got {self.group_size}")

    @property
    def symmetric(self) -> bool:
        return self.bits == 8

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def group_of(self, in_features: int) -> int:
        """The inputs one step/offset covers in a layer with `in_features` inputs."""
        if self.symmetric:
            return in_features
        if in_features % self.group_size or in_features % 64:
            raise GridError(f"a layer with {in_features} inputs cannot be cut into groups of "
                            f"{self.group_size} (the group must divide the inputs, themselves a multiple "
                            f"of 64); try --group-size 32 or 64")
        return self.group_size

    # --------------------------------------------------------------------------- the rounding
    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, offset) [rows] for the columns `w` [rows, k] that share them: their full range."""
        w = w.float()
        if self.symmetric:
            step = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
            return step, torch.zeros_like(step)
        low, high = w.amin(dim=1), w.amax(dim=1)
        step = ((high - low) / self.levels).half().float()
        step = torch.where(step > 0, step, torch.ones_like(step))
        return step, low.half().float()

    def codes(self, w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Nearest codes of `w` [rows, ...] on the grid (step, offset broadcast over its last dims)."""
        while step.dim() < w.dim():
            step, offset = step[..., None], offset[..., None]
        q = torch.round((w.float() - offset) / step)
        return q.clamp(-127, 127) if self.symmetric else q.clamp(0, self.levels)

    def round(self, w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """`w` replaced by its nearest grid values (quantize, then dequantize)."""
        while step.dim() < w.dim():
            step, offset = step[..., None], offset[..., None]
        return self.codes(w, step, offset) * step + offset

    def rtn(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round to nearest, the baseline: (codes [out, in], step and offset [out, in / group])."""
        out_features, in_features = weight.shape
        g = self.group_of(in_features)
        groups = weight.float().reshape(out_features * (in_features // g), g)
        step, offset = self.fit(groups)
        codes = self.codes(groups, step, offset)
        shape = (out_features, in_features // g)
        return codes.reshape(out_features, in_features), step.reshape(shape), offset.reshape(shape)

    def dequantize(self, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The weight [out, in] that codes + per-group step and offset stand for."""
        out_features, in_features = codes.shape
        g = in_features // step.shape[1]
        w = codes.float().view(out_features, -1, g) * step[..., None] + offset[..., None]
        return w.view(out_features, in_features)

    def layer(self, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
              bias: torch.Tensor | None = None) -> QuantizedLinear:
        """The engine layer storing exactly this grid: `Int8Linear` or `Int4Linear`."""
        bias = None if bias is None else bias.detach().clone()
        if self.symmetric:
            return Int8Linear(codes.to(torch.int8), step.reshape(-1), bias)
        return Int4Linear.from_codes(codes, step, offset, bias)
