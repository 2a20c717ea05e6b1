"""Rotary position embeddings (RoPE).

Each pair of channels in a query or key is rotated by an angle proportional to the
token's position, so the dot product q·k depends only on the *distance* between the
two tokens. lmforge uses the "rotate half" layout of Hugging Face checkpoints: channel
i is paired with channel i + head_dim/2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Angular speed of each channel pair: theta^(-2i/d), optionally stretched for long context."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    if scaling["type"] == "linear":  # position interpolation: every position divided by factor
        return (inv_freq / scaling["factor"]).float()
    if scaling["type"] == "llama3":
        return _llama3_scaling(inv_freq, scaling).float()
    raise ValueError(f"unsupported rope scaling {scaling['type']!r}")


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: slow (long-wavelength) channels are interpolated, fast ones kept, a smooth ramp between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    original = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelength > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= high_wavelen) & (wavelength <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for the positions of a batch (no fixed maximum length)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Follow the model across devices but stay fp32: bf16 frequencies rotate far positions wrongly."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if not inv_freq.is_meta and not self.inv_freq.is_meta:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin of shape [B, 1, T, head_dim] in fp32."""
        angles = positions[..., None].float() * self.inv_freq.float()  # [B, T, hd/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, hd]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its angle: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
