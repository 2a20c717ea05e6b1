"""NF4 (4-bit NormalFloat) with double-quantized scales: how QLoRA keeps a frozen base in 4 bits.

**The code.** Weights of a trained layer are close to normally distributed. Cut N(0, 1)
into bins of equal probability and represent each bin by its quantile: every one of the
16 four-bit codes is then used equally often, which is the information-theoretically
best use of 4 bits for normal data (Dettmers et al. 2023). Concretely: 8 quantiles of
the positive half, 7 of the negative half and an exact 0 (so that zero-padding and
zero-initialised weights stay exact), all divided by the largest so that they span
[-1, 1]. The outermost quantile is taken at 0.9677 rather than 1 (which would be
infinite).

**Blocks.** A block of 64 consecutive weights is divided by its absolute maximum
(`absmax`), so every value lands in [-1, 1], and each is replaced by the index of the
nearest code (a value exactly halfway goes to the lower code). Two indices share a byte,
the first in the high nibble. Dequantizing is code[index] * absmax.

**Double quantization.** One fp32 absmax per 64 weights costs 0.5 bits per weight. The
absmaxes are themselves quantized: their mean (`offset`) is subtracted, and blocks of
256 of them are quantized to 8 bits with bitsandbytes' *dynamic* code (a sign, a run of
zeros as a decimal exponent, the rest a linear fraction: fine steps near 0, coarse near
1) against each block's own fp32 absmax. The cost drops to 8/64 + 32/(64*256) = 0.127
bits per weight; 4.127 bits in all, 12.9% of fp32.

Every step gives the bytes `bitsandbytes.functional.quantize_4bit(w, blocksize=64,
quant_type="nf4", compress_statistics=True)` gives on a CPU (tests check it), with one
documented exception: for the 8-bit codes of the absmaxes we take the nearest code (a
value halfway goes to the lower one), as bitsandbytes' portable PyTorch kernel does.
Its native CPU kernel searches the code with a float32 index whose thresholds sit up to
about 1e-5 away from the midpoints, so on a few percent of absmaxes it picks a
neighbouring code; the stored scales then differ by a step of the 8-bit code, the 4-bit
weights not at all. bitsandbytes reads our bytes and dequantizes them to the same
floats we do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

BLOCK = 64  # weights per absmax
STATS_BLOCK = 256  # absmaxes per second-level absmax (double quantization)
NF4_OFFSET = 0.9677083  # the outermost quantile, as in the QLoRA paper


@cache
def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, sorted, in float32: quantiles of N(0, 1), scaled to [-1, 1].

    The probabilities are spaced in float32, the quantiles computed in float64 and
    rounded to float32 before the scaling, as the published table was made.
    """
    def quantiles(count: int) -> torch.Tensor:  # `count` equal-probability levels from offset to 0.5
        probabilities = torch.linspace(NF4_OFFSET, 0.5, count + 1, dtype=torch.float32)[:-1]
        return torch.special.ndtri(probabilities.double()).float()

    values = torch.cat([quantiles(8), torch.zeros(1), -quantiles(7)]).sort().values
    return values / values.max()


@cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted values in [-1, 1]) for the absmaxes.

    For e = 0..6, 2**e + 1 evenly spaced fractions in [0.1, 1] give 2**e midpoints, scaled by
    10**(e - 6) and mirrored for the sign: 127 magnitudes from 1e-7 to 1; then 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        middles = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * middles).tolist() + (-(10 ** (e - 6)) * middles).tolist()
    values += [0.0, 1.0]
    return torch.tensor(values, dtype=torch.float32).sort().values


@cache
def _byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2]: the two NF4 values a packed byte holds (high nibble first)."""
    byte = torch.arange(256)
    return torch.stack([nf4_code()[byte >> 4], nf4_code()[byte & 0x0F]], dim=1).to(device)


@dataclass
class NF4Tensor:
    """A weight matrix in NF4 with double-quantized scales (what QLoRA stores for a frozen linear)."""

    packed: torch.Tensor  # uint8 [numel / 2]: two 4-bit code indices per byte, high nibble first
    absmax_codes: torch.Tensor  # uint8 [numel / 64]: each block's absmax - offset, in the dynamic code
    absmax_scales: torch.Tensor  # float32 [ceil(numel / 64 / 256)]: the absmax of each 256 absmaxes
    offset: torch.Tensor  # float32 scalar: the mean absmax, subtracted before quantizing them
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype it was quantized from (and dequantizes to by default)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_codes,
                                                          self.absmax_scales, self.offset))

    def absmax(self) -> torch.Tensor:
        """The first-level scales, recovered from their 8-bit codes."""
        values = dynamic_code().to(self.absmax_codes.device)[self.absmax_codes.long()]
        n, blocks = values.numel(), self.absmax_scales.numel()
        padded = F.pad(values, (0, blocks * STATS_BLOCK - n)).view(blocks, STATS_BLOCK)
        scaled = padded * self.absmax_scales[:, None]
        return scaled.view(-1)[:n] + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """code[index] * absmax, for every weight: a byte is looked up as its two values at once."""
        pairs = _byte_pairs(self.packed.device)[self.packed.long()]  # [numel / 2, 2]: high nibble, low nibble
        values = pairs.view(-1, BLOCK) * self.absmax().view(-1, 1)
        return values.reshape(self.shape).to(dtype or self.dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        return NF4Tensor(self.packed.to(device), self.absmax_codes.to(device), self.absmax_scales.to(device),
                         self.offset.to(device), self.shape, self.dtype)


def quantize_nf4(weight: torch.Tensor) -> NF4Tensor:
    """Quantize a float tensor (its element count a multiple of 64) to NF4 with double quantization."""
    if weight.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} weights, got {weight.numel()} (shape "
                         f"{tuple(weight.shape)})")
    flat = weight.detach().reshape(-1, BLOCK).float().cpu()
    absmax = flat.abs().max(dim=1).values
    scaled = (flat * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    indices = torch.bucketize(scaled, midpoints).to(torch.uint8)  # halfway goes to the lower code
    packed = (indices[0::2] << 4) | indices[1::2]
    offset = absmax.mean()
    absmax_codes, absmax_scales = _quantize_blockwise_8bit(absmax - offset)
    stored = NF4Tensor(packed, absmax_codes, absmax_scales, offset, tuple(weight.shape), weight.dtype)
    return stored.to(weight.device)


# --------------------------------------------------------------------------- the 8-bit step
def _quantize_blockwise_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of 256 values -> (uint8 indices of the nearest dynamic code, float32 absmax per block)."""
    n = values.numel()
    blocks = -(-n // STATS_BLOCK)
    padded = torch.zeros(blocks * STATS_BLOCK)
    padded[:n] = values
    absmax = padded.view(blocks, STATS_BLOCK).abs().max(dim=1).values
    if n % STATS_BLOCK:  # the last, partial block's absmax covers only its own values
        absmax[-1] = values[(blocks - 1) * STATS_BLOCK:].abs().max()
    scales = absmax.clamp(min=1e-38).repeat_interleave(STATS_BLOCK)[:n]
    scaled = (values * (1.0 / scales)).clamp(-1, 1)
    code = dynamic_code()
    indices = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)  # halfway goes to the lower code
    return indices.to(torch.uint8), absmax
