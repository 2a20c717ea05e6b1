"""Perplexity: how surprised a model is by text it did not see, exp(mean negative log-likelihood).

Each window of T tokens is scored on predicting its tokens 1..T-1 from the ones before
(the first token of a window has no context and is not scored). Non-overlapping windows
are the convention of the quantization papers (GPTQ, AWQ: WikiText-2 in 2048-token
windows); they understate what a model does with a longer context, equally for every
model compared on the same windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               progress: Callable[[str], None] | None = None) -> Perplexity:
    """Perplexity of `model` on `windows` [n, T] of token ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    started = time.perf_counter()
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(ids).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += ids[:, 1:].numel()
        if progress is not None:
            done = min(start + batch_size, windows.shape[0])
            rate = count / (time.perf_counter() - started)
            progress(f"perplexity: {done}/{windows.shape[0]} windows, {rate:,.0f} tokens/s, "
                     f"ETA {(windows[:, 1:].numel() - count) / rate:.0f} s")
    model.train(was_training)
    return Perplexity(nll=total / count, tokens=count, seconds=time.perf_counter() - started)
