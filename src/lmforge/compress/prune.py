"""Pruning: set a fraction of the weights to zero, choosing which by magnitude, Wanda or SparseGPT.

- **Magnitude**: drop the smallest |w| of each layer. No data needed; the baseline.
- **Wanda** (pruning by Weights AND activations): score |w_ij| * ||X_j||_2, the weight
  times the norm of the input channel it multiplies over calibration tokens, and drop the
  lowest scores *within each output row* (each output loses the same share). A large
  weight on a channel that is always near zero is cheap to lose; a small weight on a
  channel with huge activations is not. No weight is updated.
- **SparseGPT**: GPTQ's machinery with zero as the "rounding": walk the columns, and each
  time weights are removed push their error onto the columns not yet visited through the
  inverse Hessian, so the remaining weights compensate. Which weights go is decided per
  block of columns by the OBS score w^2 / [H^-1]_jj^2.

Sparsity is a fraction (0.5: half of every layer's weights) or an n:m pattern (2:4: in
every run of 4 consecutive inputs of a row, 2 are zero), the pattern sparse tensor cores
run at twice the speed. Here the pruned weights are stored as zeros in dense matrices:
the file and the decode speed do not change, only what the model computes. Embeddings
and the LM head are not pruned.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from lmforge.compress.gptq import inverse_hessian_factor
from lmforge.compress.layerwise import linear_layers, walk_blocks


class PruneError(ValueError):
    """A sparsity or method that cannot be applied."""


@dataclass(frozen=True)
class Sparsity:
    fraction: float  # of the weights set to zero
    n: int = 0  # n:m pattern: n zeros in every m consecutive inputs (0: unstructured)
    m: int = 0

    @classmethod
    def parse(cls, text: str | float) -> Sparsity:
        """'0.5' -> half of each layer; '2:4' -> 2 of every 4 consecutive inputs."""
        if isinstance(text, str) and (match := re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise PruneError(f"an n:m sparsity needs 0 < n < m, got {text!r}")
            return cls(n / m, n, m)
        try:
            fraction = float(text)
        except ValueError:
            raise PruneError(f"sparsity must be a fraction (0.5) or n:m (2:4), got {text!r}") from None
        if not 0 < fraction < 1:
            raise PruneError(f"sparsity must be between 0 and 1, got {fraction}")
        return cls(fraction)

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"


def _check_pattern(weight: torch.Tensor, sparsity: Sparsity) -> None:
    if sparsity.structured and weight.shape[1] % sparsity.m:
        raise PruneError(f"a layer with {weight.shape[1]} inputs cannot be cut into runs of {sparsity.m}")


def _drop_lowest(score: torch.Tensor, sparsity: Sparsity, *, per_row: bool) -> torch.Tensor:
    """Boolean mask of the weights to zero: the lowest scores per row, per layer, or n of every m."""
    if sparsity.structured:
        runs = score.reshape(score.shape[0], -1, sparsity.m)
        lowest = runs.topk(sparsity.n, dim=-1, largest=False).indices
        return torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, lowest, True).reshape(score.shape)
    if per_row:
        k = int(score.shape[1] * sparsity.fraction)
        lowest = score.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, lowest, True)
    k = int(score.numel() * sparsity.fraction)  # exactly k, whatever the ties
    lowest = score.flatten().topk(k, largest=False).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    return mask.scatter_(0, lowest, True).view_as(score)


def magnitude_mask(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Zero the smallest |w| of the whole layer (n:m: of each run)."""
    _check_pattern(weight, sparsity)
    return _drop_lowest(weight.abs().float(), sparsity, per_row=False)


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Zero the lowest |w_ij| * ||X_j|| of each output row (n:m: of each run)."""
    _check_pattern(weight, sparsity)
    score = weight.abs().float() * input_sq_sum.float().sqrt()[None, :]
    return _drop_lowest(score, sparsity, per_row=True)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, *, damp: float = 0.01,
              block_size: int = 128) -> torch.Tensor:
    """The pruned weight [out, in]: zeros chosen by OBS scores per block, survivors updated to compensate."""
    _check_pattern(weight, sparsity)
    out_features, in_features = weight.shape
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, damp)
    if sparsity.structured:
        block_size = max(block_size // sparsity.m, 1) * sparsity.m
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        w_block = w[:, b0:b1].clone()
        errors = torch.zeros_like(w_block)
        u_block = u[b0:b1, b0:b1]
        d = u_block.diagonal()
        if not sparsity.structured:  # the block's lowest OBS scores across all rows (SparseGPT's choice)
            prune = _drop_lowest(w_block.square() / d.square()[None, :], sparsity, per_row=False)
        else:
            prune = torch.zeros_like(w_block, dtype=torch.bool)
        for i in range(b1 - b0):
            if sparsity.structured and i % sparsity.m == 0:  # choose n of the next m, on today's weights
                run = slice(i, i + sparsity.m)
                prune[:, run] = _drop_lowest(w_block[:, run].square() / d[run].square()[None, :], sparsity,
                                             per_row=True)
            current = w_block[:, i]
            kept = torch.where(prune[:, i], torch.zeros_like(current), current)
            error = (current - kept) / u_block[i, i]
            w_block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            w_block[:, i] = kept
            errors[:, i] = error
        w[:, b0:b1] = w_block
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return w.to(weight.dtype)


# ------------------------------------------------------------------------------------- a whole model
PRUNE_METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneReport:
    method: str
    sparsity: str
    layers: int = 0
    zeros: int = 0  # weights of the pruned layers that are zero afterwards
    weights: int = 0  # weights in the pruned layers
    calibration_tokens: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        calibration = f" on {self.calibration_tokens:,} calibration tokens" if self.calibration_tokens else ""
        return (f"{self.method}: {self.layers} linear layers pruned to {self.sparsity}{calibration}; "
                f"{self.zeros:,} of {self.weights:,} weights are now zero "
                f"({self.zeros / max(self.weights, 1):.1%}; stored dense, so the file size is unchanged) "
                f"({self.seconds:.0f} s)")


@torch.no_grad()
def prune_model(model, method: str, sparsity: Sparsity, *, calibration: torch.Tensor | None = None,
                damp: float = 0.01, batch_size: int = 8, progress=None) -> PruneReport:
    """Prune every linear layer of every block of `model` in place (embeddings and head untouched)."""
    if method not in PRUNE_METHODS:
        raise PruneError(f"method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    if method != "magnitude" and calibration is None:
        raise PruneError(f"{method} needs calibration text")
    if not 0 < damp < 1:
        raise PruneError(f"damp must be between 0 and 1 (a fraction of the Hessian's mean diagonal), "
                         f"got {damp}")
    for block in model.blocks:
        for name, layer in linear_layers(block).items():
            try:
                _check_pattern(layer.weight, sparsity)
            except PruneError as err:
                raise PruneError(f"{name}: {err}") from None
    report = PruneReport(method, str(sparsity))
    started = time.perf_counter()
    model.requires_grad_(False)

    def prune_block(block, inputs) -> None:
        for name, layer in linear_layers(block).items():
            w = layer.weight
            if method == "magnitude" or not inputs[name].seen:  # unseen: an expert no token was routed to
                w.masked_fill_(magnitude_mask(w, sparsity), 0.0)
            elif method == "wanda":
                w.masked_fill_(wanda_mask(w, inputs[name].sq_sum, sparsity), 0.0)
            else:
                w.copy_(sparsegpt(w, inputs[name].hessian(), sparsity, damp=damp))
            report.layers += 1
            report.zeros += int((w == 0).sum())
            report.weights += w.numel()
        if inputs is not None:
            inputs.clear()

    if method == "magnitude":
        for block in model.blocks:
            prune_block(block, None)
    else:
        walk_blocks(model, calibration, lambda index, block, inputs: prune_block(block, inputs),
                    xtx=method == "sparsegpt", batch_size=batch_size, progress=progress)
        report.calibration_tokens = calibration.numel()
    report.seconds = time.perf_counter() - started
    return report
