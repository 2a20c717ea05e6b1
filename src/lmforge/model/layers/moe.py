"""Mixture of Experts: each token is sent to its top-k of E expert MLPs.

A router scores the experts, the top k are run, and their outputs are mixed with the
renormalised router probabilities (Mixtral). Left alone, a router collapses onto a few
experts, so training adds the Switch Transformer load-balancing loss:
E * sum_e (fraction of tokens that chose e among their k) * (mean router probability of e),
which is k when routing is perfectly uniform. This is the convention of transformers'
Mixtral, so an imported `router_aux_loss_coef` means the same pressure here; lmforge
averages the per-layer losses, where transformers pools the layers' statistics first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers.mlp import MLP


class MixtureOfExperts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.n_experts_per_token
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixed expert outputs and this layer's load-balancing loss."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(tokens).float(), dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel():
                expert_out = expert(tokens[token_idx]) * weights[token_idx, slot, None]
                out.index_add_(0, token_idx, expert_out)

        n_experts = probs.shape[-1]
        routed_fraction = F.one_hot(chosen, n_experts).float().mean(dim=0).sum(dim=0)  # [E], sums to k
        aux_loss = n_experts * (routed_fraction * probs.mean(0)).sum()
        return out.reshape(shape), aux_loss
