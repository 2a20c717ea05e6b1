"""Objectives: what the one training loop minimises. Each maps (model, `Batch`) to a loss.

The trainer knows nothing about language modelling; pretraining, SFT, reward models,
DPO and distillation differ only in the `Objective` plugged into it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.train.batch import IGNORE_INDEX, Batch


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to backpropagate, detached metrics to log, e.g. {"ce": ..., "aux": ...})."""
        ...


class CausalLMObjective:
    """Next-token prediction: cross-entropy of token t+1 given tokens 0..t, averaged over the
    labelled positions (all of them in pretraining; the assistant's tokens in SFT).

    For one position the loss is -log p(correct next token): if the model gives
    "Paris" probability 0.8 after "The capital of France is", the loss there is
    -ln 0.8 = 0.22 nats. A Mixture-of-Experts model adds its load-balancing loss.

    `only_labelled=True` computes the LM head only at the labelled positions (the same
    loss, less work where most positions take none: SFT's prompts); pretraining labels
    every position, and selecting them would only add a gather.
    """

    def __init__(self, *, only_labelled: bool = False) -> None:
        self.only_labelled = only_labelled

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.only_labelled:
            labelled = batch.labels != IGNORE_INDEX
            out = model(batch.input_ids, batch.positions, logits_at=labelled)
            ce = next_token_loss(out.logits, batch.labels[labelled])
        else:
            out = model(batch.input_ids, batch.positions)
            ce = next_token_loss(out.logits, batch.labels)
        metrics = {"ce": ce.detach()}
        loss = ce
        if getattr(out, "aux_loss", None) is not None:
            loss = ce + out.aux_loss
            metrics["aux"] = out.aux_loss.detach()
        return loss, metrics


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions, the softmax in fp32 even under bf16 autocast.

    A batch with no labelled position gives 0 (not NaN), so it cannot poison a step."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
