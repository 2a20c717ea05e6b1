"""GRPO: policy optimisation against a reward, with the group of answers to the same prompt as baseline.

PPO needs a value model to tell a good action from a lucky one. GRPO (Shao et al. 2024,
DeepSeekMath) drops it: sample G completions of each prompt, score them, and use how a
completion's reward compares with its siblings' as its advantage, for every one of its tokens:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

(std unbiased, eps 1e-4, as trl; `scale_rewards="none"` keeps only r_i - mean, Dr. GRPO's
choice, since dividing by the std weighs near-solved and near-hopeless prompts up;
"batch" divides by the std of the whole buffer). A group whose rewards are all equal
teaches nothing: its advantages are 0.

The loss per completion token t is PPO's clipped surrogate plus an optional KL penalty:

    rho_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
    l_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t
    KL_t  = exp(q) - q - 1,  q = log pi_ref(y_t) - log pi_theta(y_t)   (the k3 estimator:
            unbiased for KL(pi_theta || pi_ref) under samples of pi_theta, and never negative)

pi_old is the policy that sampled (its log-probs recomputed, see rollout.py), so rho = 1
at the first update of a buffer; later epochs over the same buffer move rho, and the clip
stops a token's gradient once rho has moved past 1 +- eps in the direction A favours
(the min picks the clipped, constant branch).

Aggregation (`loss_type`), trl's names: "dapo" (trl's default) sums l_t over every token
of the optimizer step and divides by their number, so long and short answers weigh per
token; "grpo" averages each completion's tokens, then the completions (a long answer's
tokens weigh less); "dr_grpo" divides the sum by rows x max_new_tokens, a constant.

Metrics (trl's names): reward, reward_std (within groups), kl, clip_ratio,
completions/mean_length, completions/clipped_ratio (truncated), entropy, rollout/tokens_per_s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lmforge.align.rollout import (
    RewardFn,
    RolloutConfig,
    RolloutError,
    Rollouts,
    RolloutSource,
    disable_dropout,
    frozen_copy,
    masked_mean,
    position_logps,
    token_logps,
)
from lmforge.train.batch import IGNORE_INDEX, Batch


@dataclass
class GRPOConfig:
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # samples_per_prompt is G
    epsilon: float = 0.2  # clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's asymmetric upper clip (0.28 in the paper)
    beta: float = 0.0  # KL penalty to the reference (trl's default: 0, no reference model needed)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"

    def validate(self) -> None:
        self.rollout.validate()
        if self.rollout.samples_per_prompt < 2:
            raise RolloutError("grpo needs rollout.samples_per_prompt >= 2: the group is the baseline")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise RolloutError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.loss_type not in ("dapo", "grpo", "dr_grpo"):
            raise RolloutError(f"loss_type must be dapo, grpo or dr_grpo, got {self.loss_type!r}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0) or self.beta < 0:
            raise RolloutError("epsilon and epsilon_high must be > 0 and beta >= 0")


# ---------------------------------------------------------------------------------- the pieces, as equations
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], each row's group std [N]) for rewards [N] in groups of `group_size` adjacent rows."""
    if rewards.numel() % group_size:
        raise RolloutError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True).expand_as(groups)
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    return centred.reshape(-1), std.reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(q) - q - 1 with q = log ref - log pi (>= 0, 0 where equal)."""
    q = ref_logps - logps
    return torch.exp(q) - q - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss -min(rho A, clip(rho) A), rho, where the clipped branch is active: no gradient)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    active = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return -torch.min(unclipped, clipped), ratio, active


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
              token_norm: torch.Tensor | None = None, max_new_tokens: int = 1) -> torch.Tensor:
    """[B, T] per-token losses (0 off the mask) -> a scalar, as `loss_type` says (module docstring)."""
    per_token = per_token * mask
    if loss_type == "dapo":
        norm = token_norm[0] if token_norm is not None else mask.sum().clamp(min=1)
        return per_token.sum() / norm
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return per_token.sum() / (mask.shape[0] * max_new_tokens)
    raise RolloutError(f"unknown loss_type {loss_type!r}")


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------- making the buffer
class GRPOPrepare:
    """Rollouts -> buffer rows: rewards, group advantages, old (and reference) per-token log-probs."""

    def __init__(self, policy: nn.Module, reward_fn: RewardFn, config: GRPOConfig, *,
                 reference: nn.Module | None = None, pad_id: int = 0) -> None:
        self.policy, self.reward_fn, self.config = policy, reward_fn, config
        self.reference, self.pad_id = reference, pad_id

    def __call__(self, rollouts: Rollouts) -> Batch:
        cfg = self.config
        rewards = torch.tensor([float(r) for r in self.reward_fn(rollouts.prompts, rollouts.texts)])
        if rewards.numel() != len(rollouts.texts):
            raise RolloutError(f"reward_fn returned {rewards.numel()} rewards for {len(rollouts.texts)} "
                               "completions")
        advantages, std = group_advantages(rewards, cfg.rollout.samples_per_prompt, cfg.scale_rewards)
        ids, labels = rollouts.rows(self.pad_id)
        r = cfg.rollout
        options = dict(temperature=r.temperature, micro_batch=r.logprob_batch, precision=r.precision)
        extras = {"advantages": advantages, "reward": rewards, "reward_std": std,
                  "old_logps": token_logps(self.policy, ids, labels, **options)}
        if self.reference is not None:
            extras["ref_logps"] = token_logps(self.reference, ids, labels, **options)
        return Batch(ids, labels, None, extras)


# ---------------------------------------------------------------------------------- the objective
class GRPOObjective:
    """GRPO's loss on a micro-batch of rollout rows (an `Objective` for the one `Trainer`)."""

    def __init__(self, config: GRPOConfig) -> None:
        self.config = config

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, x = self.config, batch.extras
        mask = batch.labels != IGNORE_INDEX
        temperature = cfg.rollout.temperature
        logits = model(batch.input_ids, logits_at=mask).logits
        logps = position_logps(logits, batch.labels, mask, temperature)
        advantages = x["advantages"].float()[:, None].expand_as(logps)
        eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        per_token, ratio, active = clipped_surrogate(logps, x["old_logps"], advantages, cfg.epsilon, eps_high)
        m = mask.float()
        metrics: dict[str, torch.Tensor] = {}
        if "ref_logps" in x:
            kl = k3_kl(logps, x["ref_logps"])
            metrics["kl"] = masked_mean(kl, m).detach()
            if cfg.beta:
                per_token = per_token + cfg.beta * kl
        loss = aggregate(per_token, m, cfg.loss_type, token_norm=x.get("token_norm"),
                         max_new_tokens=cfg.rollout.max_new_tokens)
        with torch.no_grad():
            metrics |= {"clip_ratio": masked_mean(active.float(), m), "ratio": masked_mean(ratio, m),
                        "entropy": entropy_of(logits.detach(), temperature).mean()}
            metrics |= _rollout_metrics(x)
        return loss, metrics


def _rollout_metrics(extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {"reward": "reward", "reward_std": "reward_std", "completion_length": "completions/mean_length",
             "truncated": "completions/clipped_ratio", "rollout_tokens_per_s": "rollout/tokens_per_s"}
    return {name: extras[key].float().mean() for key, name in names.items() if key in extras}


# ---------------------------------------------------------------------------------- putting it together
def grpo_source(policy: nn.Module, prompts: Sequence[Any], encode: Callable[[Any], Sequence[int]],
                reward_fn: RewardFn, config: GRPOConfig, *, reference: nn.Module | None = None,
                tokenizer: Any = None, stop_ids: Sequence[int] = (), rows_per_step: int | None = None,
                pad_id: int = 0) -> RolloutSource:
    """The `BatchSource` of a GRPO run. Dropout is switched off on `policy` (rho must be 1 before updates).

    With `beta > 0` and no `reference`, the reference is a frozen copy of the policy as it is now."""
    config.validate()
    disable_dropout(policy)
    if config.beta > 0 and reference is None:
        reference = frozen_copy(policy)
    prepare = GRPOPrepare(policy, reward_fn, config, reference=reference, pad_id=pad_id)
    return RolloutSource(policy, prompts, encode, prepare, config.rollout, tokenizer=tokenizer,
                         stop_ids=stop_ids, rows_per_step=rows_per_step, pad_id=pad_id)
