"""PPO for RLHF: a policy with a value head, a KL-shaped reward, GAE, and clipped policy and value losses.

The third stage of RLHF (Ouyang et al. 2022; Stiennon et al. 2020), in the shape trl's
`PPOTrainer` and "The N implementation details of RLHF with PPO" (Huang et al. 2024) give it:

1. **Rollout**: the policy completes prompts (rollout.py); one no-grad forward of the
   policy + value head gives old log-probs log pi_old(y_t) and values V_t at every
   completion token; the reference gives log pi_ref(y_t); the reward function scores the
   whole completion once.
2. **Reward per token**: the score arrives at the last token; every token pays for
   drifting from the reference, so the policy cannot win by forgetting language:

       r_t = -kl_coef * KL_t  (+ score on the last token),
       KL_t = log pi_old - log pi_ref (k1: unbiased, can be negative) or
              exp(q) - q - 1 with q = log pi_ref - log pi_old (k3: unbiased and >= 0)

3. **GAE** (Schulman et al. 2016) over the completion's tokens, backwards from its end
   (V after the last token is 0: the episode is over):

       delta_t = r_t + gamma V_{t+1} - V_t
       A_t     = delta_t + gamma lambda A_{t+1}
       returns_t = A_t + V_t   (the value head's target)

   lambda trades bias (lambda=0: one-step TD, trusts V) against variance (lambda=1: Monte
   Carlo, sum of rewards minus V_t). Advantages are whitened over the buffer (mean 0,
   variance 1), which keeps the step size independent of the reward's scale.
4. **Update**, `epochs` passes over the buffer in micro-batches:

       rho_t   = exp(log pi_theta - log pi_old)
       L_pi    = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - c, 1 + c))
       V_clip  = V_old + clip(V_theta - V_old, -c_v, c_v)
       L_V     = 0.5 mean_t max((V_theta - R_t)^2, (V_clip - R_t)^2)
       loss    = L_pi + vf_coef * L_V

   Both max-es pick the pessimistic term; where a clipped term wins, its gradient is 0.

The value head is a linear map of the Transformer's last hidden state (after the final
norm), taken with a forward hook: the model module is composed, not edited. The trunk is
shared with the policy (as trl's `AutoModelForCausalLMWithValueHead`); `detach_trunk`
keeps the value loss out of it. Checkpoints hold the policy as its own store writes it
(whole model or adapter) plus `value_head.safetensors` (`ValueHeadStore`).

Metrics carry trl's names: objective/kl, objective/scores, objective/non_score_reward,
objective/rlhf_reward, objective/entropy, policy/approxkl, policy/clipfrac, loss/policy,
loss/value, val/clipfrac, val/ratio (trl averages these over the batch: "_avg").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.align.grpo import clipped_surrogate, entropy_of
from lmforge.align.rollout import (
    RewardFn,
    RolloutConfig,
    RolloutError,
    Rollouts,
    RolloutSource,
    autocast_for,
    disable_dropout,
    frozen_copy,
    label_logps,
    masked_mean,
    position_logps,
    token_logps,
)
from lmforge.formats.safetensors_reader import load_tensors
from lmforge.model.config import ModelConfig
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.checkpoint import FullModel, ModelStore


@dataclass
class PPOConfig:
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(samples_per_prompt=1, epochs=4))
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False  # whiten the per-token rewards before GAE (trl's option, off by default)

    def validate(self) -> None:
        self.rollout.validate()
        if self.kl_estimator not in ("k1", "k3"):
            raise RolloutError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise RolloutError(f"gamma and lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.cliprange <= 0 or self.cliprange_value <= 0 or self.vf_coef < 0 or self.kl_coef < 0:
            raise RolloutError("cliprange and cliprange_value must be > 0; vf_coef and kl_coef >= 0")


# ---------------------------------------------------------------------------------- the model
class PolicyWithValue(nn.Module):
    """The policy `Transformer` and a scalar value head on its final hidden states.

    `forward(ids, logits_at=mask)` -> (logits [n, V] at the mask, values [B, T])."""

    def __init__(self, policy: nn.Module, *, detach_trunk: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.d_model, 1, device=next(policy.parameters()).device)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at first: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)
        self.detach_trunk = detach_trunk

    @property
    def config(self) -> ModelConfig:
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.policy.final_norm.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            logits = self.policy(input_ids, positions, logits_at=logits_at).logits
        finally:
            hook.remove()
        hidden = captured[0].detach() if self.detach_trunk else captured[0]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values


class ValueHeadStore:
    """A checkpoint of a `PolicyWithValue`: the policy as `inner` writes it, plus value_head.safetensors."""

    FILE = "value_head.safetensors"

    def __init__(self, inner: ModelStore | None = None) -> None:
        self.inner = inner or FullModel(source="lmforge align ppo")

    def write(self, folder: Path, model_state: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer: Any, step: int) -> None:
        policy = {k.removeprefix("policy."): v for k, v in model_state.items() if k.startswith("policy.")}
        self.inner.write(folder, policy, config, tokenizer, step)
        head = {k: v.detach().cpu().contiguous() for k, v in model_state.items()
                if k.startswith("value_head.")}
        save_file(head, str(folder / self.FILE))

    def read(self, folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        state = {f"policy.{k}": v for k, v in self.inner.read(folder, config).items()}
        head, _ = load_tensors(folder / self.FILE)
        return state | dict(head)


# ---------------------------------------------------------------------------------- the pieces, as equations
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N, L] for completions left-aligned in [N, L] (mask: real tokens, a prefix
    of each row). V beyond a completion's end counts as 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as trl's `masked_whiten`)."""
    m = mask.float()
    mean = masked_mean(values, m)
    n = m.sum()
    var = ((values - mean) ** 2 * m).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """KL(pi || ref) per sampled token: k1 = log pi - log ref; k3 = exp(q) - q - 1, q = log ref - log pi."""
    if estimator == "k1":
        return logps - ref_logps
    q = ref_logps - logps
    return torch.exp(q) - q - 1


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token 0.5 max((V - R)^2, (V_clip - R)^2), where the clipped term is the larger: no gradient)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain, pessimistic = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(plain, pessimistic), pessimistic > plain


def _to_completions(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """[N, T] values at labelled positions -> [N, width], left-aligned (row-major order keeps each row)."""
    out = torch.zeros(mask.shape[0], width, dtype=x.dtype)
    lengths = mask.sum(1)
    out[torch.arange(width)[None] < lengths[:, None]] = x[mask]
    return out


def _from_completions(c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=c.dtype)
    lengths = mask.sum(1)
    out[mask] = c[torch.arange(c.shape[1])[None] < lengths[:, None]]
    return out


# ---------------------------------------------------------------------------------- making the buffer
class PPOPrepare:
    """Rollouts -> buffer rows: scores, old log-probs and values, KL-shaped rewards, GAE."""

    def __init__(self, model: PolicyWithValue, reference: nn.Module, reward_fn: RewardFn, config: PPOConfig,
                 *, pad_id: int = 0) -> None:
        self.model, self.reference, self.reward_fn, self.config = model, reference, reward_fn, config
        self.pad_id = pad_id

    @torch.no_grad()
    def old_logps_and_values(self, ids: torch.Tensor,
                             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, model = self.config, self.model
        device = next(model.parameters()).device
        logps, values = torch.zeros(labels.shape), torch.zeros(labels.shape)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(ids), cfg.rollout.logprob_batch):
                rows = slice(start, start + cfg.rollout.logprob_batch)
                lab = labels[rows].to(device)
                mask = lab != IGNORE_INDEX
                with autocast_for(device, cfg.rollout.precision):
                    logits, v = model(ids[rows].to(device), logits_at=mask)
                logps[rows][mask.cpu()] = label_logps(logits, lab[mask], cfg.rollout.temperature).cpu()
                values[rows] = (v * mask).cpu()
        finally:
            model.train(was_training)
        return logps, values

    def __call__(self, rollouts: Rollouts) -> Batch:
        cfg = self.config
        ids, labels = rollouts.rows(self.pad_id)
        mask = labels != IGNORE_INDEX
        scores = torch.tensor([float(s) for s in self.reward_fn(rollouts.prompts, rollouts.texts)])
        if scores.numel() != len(rollouts.texts):
            raise RolloutError(f"reward_fn returned {scores.numel()} scores for {len(rollouts.texts)} "
                               "completions")
        old_logps, old_values = self.old_logps_and_values(ids, labels)
        ref_logps = token_logps(self.reference, ids, labels, temperature=cfg.rollout.temperature,
                                micro_batch=cfg.rollout.logprob_batch, precision=cfg.rollout.precision)
        kl = kl_per_token(old_logps, ref_logps, cfg.kl_estimator) * mask
        non_score = -cfg.kl_coef * kl
        width = int(mask.sum(1).max())
        c_mask = torch.arange(width)[None] < mask.sum(1)[:, None]
        rewards = _to_completions(non_score, mask, width)
        last = mask.sum(1) - 1
        rewards[torch.arange(len(rewards)), last] += scores
        if cfg.whiten_rewards:
            rewards = whiten(rewards, c_mask, shift_mean=False)
        values = _to_completions(old_values, mask, width)
        advantages, returns = gae(rewards, values, c_mask.float(), cfg.gamma, cfg.lam)
        advantages = whiten(advantages, c_mask)
        extras = {"old_logps": old_logps, "old_values": old_values, "ref_logps": ref_logps,
                  "advantages": _from_completions(advantages, mask),
                  "returns": _from_completions(returns, mask),
                  "score": scores, "kl_sum": kl.sum(1), "non_score_reward": non_score.sum(1)}
        return Batch(ids, labels, None, extras)


# ---------------------------------------------------------------------------------- the objective
class PPOObjective:
    """PPO's clipped policy loss + vf_coef x clipped value loss on a micro-batch (an `Objective`)."""

    def __init__(self, config: PPOConfig) -> None:
        self.config = config

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, x = self.config, batch.extras
        mask = batch.labels != IGNORE_INDEX
        m = mask.float()
        logits, values = model(batch.input_ids, logits_at=mask)
        logps = position_logps(logits, batch.labels, mask, cfg.rollout.temperature)
        pg, ratio, pg_clipped = clipped_surrogate(logps, x["old_logps"], x["advantages"], cfg.cliprange,
                                                  cfg.cliprange)
        vf, vf_clipped = value_loss(values, x["old_values"], x["returns"], cfg.cliprange_value)
        norm = x["token_norm"][0] if "token_norm" in x else m.sum().clamp(min=1)
        pg_loss, vf_loss = (pg * m).sum() / norm, (vf * m).sum() / norm
        loss = pg_loss + cfg.vf_coef * vf_loss
        with torch.no_grad():
            diff = logps - x["old_logps"]
            metrics = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(),
                       "policy/clipfrac": masked_mean(pg_clipped.float(), m),
                       "val/clipfrac": masked_mean(vf_clipped.float(), m),
                       "policy/approxkl": 0.5 * masked_mean(diff ** 2, m),
                       "policy/entropy": entropy_of(logits.detach(), cfg.rollout.temperature).mean(),
                       "val/ratio": masked_mean(ratio, m),
                       "objective/kl": x["kl_sum"].mean(), "objective/scores": x["score"].mean(),
                       "objective/non_score_reward": x["non_score_reward"].mean(),
                       "objective/rlhf_reward": (x["score"] + x["non_score_reward"]).mean()}
            for key, name in (("completion_length", "completions/mean_length"),
                              ("truncated", "completions/clipped_ratio"),
                              ("rollout_tokens_per_s", "rollout/tokens_per_s")):
                if key in x:
                    metrics[name] = x[key].float().mean()
        return loss, metrics


# ---------------------------------------------------------------------------------- putting it together
def ppo_source(model: PolicyWithValue, prompts: Sequence[Any], encode: Callable[[Any], Sequence[int]],
               reward_fn: RewardFn, config: PPOConfig, *, reference: nn.Module | None = None,
               tokenizer: Any = None, stop_ids: Sequence[int] = (), rows_per_step: int | None = None,
               pad_id: int = 0) -> RolloutSource:
    """The `BatchSource` of a PPO run; the `Trainer` trains `model` (policy + value head) with `PPOObjective`.

    Dropout is switched off; without `reference`, the reference is a frozen copy of the policy now."""
    config.validate()
    disable_dropout(model)
    reference = reference if reference is not None else frozen_copy(model.policy)
    prepare = PPOPrepare(model, reference, reward_fn, config, pad_id=pad_id)
    return RolloutSource(model.policy, prompts, encode, prepare, config.rollout, tokenizer=tokenizer,
                         stop_ids=stop_ids, rows_per_step=rows_per_step, pad_id=pad_id)
