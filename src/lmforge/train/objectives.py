"""Objectives: what the one training loop minimises. Each maps (model, batch) to a loss.

The trainer knows nothing about language modelling; pretraining, SFT, reward models,
DPO and distillation differ only in the `Objective` plugged into it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to backpropagate, detached metrics to log, e.g. {"ce": ..., "aux": ...})."""
        ...


class CausalLMObjective:
    """Next-token prediction: cross-entropy of token t+1 given tokens 0..t, averaged over positions.

    For one position the loss is -log p(correct next token): if the model gives
    "Paris" probability 0.8 after "The capital of France is", the loss there is
    -ln 0.8 = 0.22 nats. A Mixture-of-Experts model adds its load-balancing loss.
    """

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out = model(inputs)
        logits = out.logits.float()  # the softmax in fp32 even under bf16 autocast
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        metrics = {"ce": ce.detach()}
        loss = ce
        if getattr(out, "aux_loss", None) is not None:
            loss = ce + out.aux_loss
            metrics["aux"] = out.aux_loss.detach()
        return loss, metrics
