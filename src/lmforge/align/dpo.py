"""Direct preference optimisation and its family: losses on sequence log-probabilities, no reward model.

Why DPO needs no reward model. RLHF maximises E[r(x, y)] - beta KL(pi || pi_ref). Its optimum
is pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so any reward can be read back from
its optimal policy: r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x). Put that
into the Bradley-Terry likelihood of a human preference, P(y_w > y_l) = sigmoid(r_w - r_l):
the intractable Z(x) cancels in the difference, leaving a loss on the policy itself,

    L_DPO = -log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]).

The implicit reward beta log(pi/pi_ref) of each completion is what trl logs as
`rewards/chosen` and `rewards/rejected`. At the first step pi = pi_ref, both rewards are
0 and the loss is -log sigmoid(0) = ln 2 exactly.

The family, each a plain function of log-probabilities below (testable without a model):
- `sigmoid` (DPO); with `label_smoothing` eps it is cDPO, the expected loss when a label
  is flipped with probability eps: -(1-eps) log sigmoid(beta d) - eps log sigmoid(-beta d).
  (trl 1.16's `sigmoid` ignores label_smoothing; its `robust` and CPO's `sigmoid` use it.)
- `robust` (Chowdhury et al.): the unbiased estimate of the clean loss under flip rate eps,
  [(1-eps) l(d) - eps l(-d)] / (1 - 2 eps) with l(d) = -log sigmoid(beta d).
- `ipo`: a squared loss that keeps the log-ratio gap at 1/(2 beta) instead of pushing it to
  infinity, (d_avg - 1/(2 beta))^2, on per-token averages of the log-ratios (as trl does).
- `simpo`: no reference; the reward is the length-normalised log-prob beta/|y| log pi(y),
  and the winner must lead by a margin gamma: -log sigmoid(beta (avg_w - avg_l) - gamma).
- `orpo`: no reference; SFT's NLL on the chosen completion plus beta times the log-odds
  ratio loss -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = p/(1-p) with p the
  per-token average probability exp(avg log pi(y)).
- KTO (`KTOObjective`), for unpaired completions labelled desirable or not: a completion's
  value is sigmoid(beta (log-ratio - z)) against a reference point z, the policy's KL from
  the reference estimated on mismatched (prompt, completion) pairs; the loss is 1 - value
  for desirable completions, 1 - sigmoid(beta (z - log-ratio)) for undesirable ones.

Batches follow the pair-batch convention (`lmforge.align.preferences.PreferenceSource`).
Chosen and rejected rows share one forward of 2B rows, and the LM head runs only where a
loss is taken (`Transformer.forward(logits_at=...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.train.batch import IGNORE_INDEX, Batch

__all__ = ["LOSSES", "KTOObjective", "PreferenceObjective", "dpo_losses", "kto_losses", "orpo_log_odds",
           "preference_metrics", "sequence_logps", "simpo_losses"]

Loss = Literal["sigmoid", "ipo", "robust", "simpo", "orpo"]
LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


# ============================================================================ log-probabilities
def _token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sum of label log-probs per row [B], labelled tokens per row [B], the model's aux loss or None)."""
    labelled = labels != IGNORE_INDEX
    out = model(input_ids, logits_at=labelled)
    # the softmax in fp32 even under bf16 autocast: a sum of many log-probs is sensitive to rounding
    token = -F.cross_entropy(out.logits.float(), labels[labelled], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[labelled]
    sums = torch.zeros(labels.shape[0], device=token.device, dtype=token.dtype).index_add(0, rows, token)
    return sums, labelled.sum(1), getattr(out, "aux_loss", None)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(completion | prompt) per row [B]: the sum of the labels' log-probs (labels as in `Batch`)."""
    return _token_logps(model, input_ids, labels)[0]


def _pair_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] ids and labels, [2B, T], for one forward."""
    if "rejected_ids" not in batch.extras:
        raise ValueError("a preference loss needs pair batches (extras rejected_ids/rejected_labels); "
                         "for unpaired rows use KTOObjective")
    return (torch.cat([batch.input_ids, batch.extras["rejected_ids"]]),
            torch.cat([batch.labels, batch.extras["rejected_labels"]]))


# ============================================================================ the losses, on log-probs
def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, loss: str = "sigmoid",
               beta: float = 0.1, label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss [B] from the log-ratios log pi(y) - log pi_ref(y) of each side.

    `ipo` divides each log-ratio by its completion's token count (`chosen_tokens`, `rejected_tokens`).
    """
    d = chosen_logratios - rejected_logratios
    if loss == "sigmoid":  # DPO; cDPO when label_smoothing > 0
        return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    if loss == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * d) + label_smoothing * F.logsigmoid(-beta * d)
                ) / (1 - 2 * label_smoothing)
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        gap = (chosen_logratios / chosen_tokens.clamp(min=1)
               - rejected_logratios / rejected_tokens.clamp(min=1))
        return (gap - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown reference-based loss {loss!r} (known: sigmoid, robust, ipo)")


def simpo_losses(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float = 2.0,
                 gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO per pair [B]: -log sigmoid(beta (avg_w - avg_l) - gamma) (smoothed like cDPO when asked)."""
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at -ln 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l) [B], odds(y) = p / (1 - p) with log p the average token log-prob."""
    log_odds_chosen = chosen_avg_logps - _log1mexp(chosen_avg_logps)
    return log_odds_chosen - (rejected_avg_logps - _log1mexp(rejected_avg_logps))


def kto_losses(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float = 0.1,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO per completion [B]: 1 - sigmoid(beta (r - z)) if desirable, else 1 - sigmoid(beta (z - r))."""
    sign = torch.where(desirable, 1.0, -1.0).to(logratios.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    return weight * (1 - torch.sigmoid(beta * sign * (logratios - kl)))


# ============================================================================ objectives
def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                    rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """trl's names: batch means of the implicit rewards, their margin, how often chosen wins, log-probs."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}


@dataclass
class PreferenceObjective:
    """A pairwise preference loss as an `Objective` for the one `Trainer`.

    Reference-based losses read `ref_chosen_logps`/`ref_rejected_logps` from the batch
    (`cache_reference_logps`), else run `ref_model` (frozen) on the batch. `simpo` and `orpo`
    need no reference. `nll_on_prompt` (orpo) takes the NLL over the whole chosen sequence,
    prompt included, as trl's ORPOTrainer does; by default it covers the completion, as SFT.
    """

    loss_type: Loss = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    nll_on_prompt: bool = False
    ref_model: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSSES:
            raise ValueError(f"unknown preference loss {self.loss_type!r} (known: {', '.join(LOSSES)})")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type in ("ipo", "orpo"):
            raise ValueError(f"label_smoothing has no meaning for the {self.loss_type} loss")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.loss_type == "orpo":
            return self._orpo(model, batch)
        ids, labels = _pair_inputs(batch)
        logps, tokens, aux = _token_logps(model, ids, labels)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if self.loss_type == "simpo":
            chosen_avg = chosen / chosen_tokens.clamp(min=1)
            rejected_avg = rejected / rejected_tokens.clamp(min=1)
            losses = simpo_losses(chosen_avg, rejected_avg, beta=self.beta, gamma=self.simpo_gamma,
                                  label_smoothing=self.label_smoothing)
            metrics = _reward_metrics(self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach(),
                                      chosen_avg.detach(), rejected_avg.detach())
        else:
            ref_chosen, ref_rejected = self._reference(batch, ids, labels)
            chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
            losses = dpo_losses(chosen_ratio, rejected_ratio, loss=self.loss_type, beta=self.beta,
                                label_smoothing=self.label_smoothing, chosen_tokens=chosen_tokens,
                                rejected_tokens=rejected_tokens)
            metrics = _reward_metrics(self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach(),
                                      chosen.detach(), rejected.detach())
        loss = losses.mean()
        if aux is not None:
            loss = loss + aux
        return loss, metrics

    def _reference(self, batch: Batch, ids: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch.extras:
            return batch.extras["ref_chosen_logps"].float(), batch.extras["ref_rejected_logps"].float()
        if self.ref_model is None:
            raise ValueError(f"the {self.loss_type} loss needs reference log-probs: cache them "
                             "(cache_reference_logps) or give the objective a ref_model")
        with torch.no_grad():
            return sequence_logps(self.ref_model, ids, labels).float().chunk(2)

    def _orpo(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The odds-ratio loss on average log-probs, plus the chosen rows' NLL (full logits: it may cover
        the prompt)."""
        ids, labels = _pair_inputs(batch)
        out = model(ids)
        logits = out.logits.float()
        B = batch.rows
        labelled = labels != IGNORE_INDEX
        token = -F.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
        token = token.view_as(labels) * labelled
        avg = token.sum(1) / labelled.sum(1).clamp(min=1)
        chosen_avg, rejected_avg = avg[:B], avg[B:]
        if self.nll_on_prompt:  # every real token after the first, as trl's ORPOTrainer
            length = batch.extras["chosen_length"].to(ids.device)
            positions = torch.arange(ids.shape[1], device=ids.device)
            targets = torch.where(positions[:-1] < (length - 1).unsqueeze(1), ids[:B, 1:], IGNORE_INDEX)
            nll = F.cross_entropy(logits[:B, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        else:
            nll = -token[:B].sum() / labelled[:B].sum().clamp(min=1)
        log_odds = orpo_log_odds(chosen_avg, rejected_avg)
        ratio = F.logsigmoid(log_odds)
        loss = nll - self.beta * ratio.mean()
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + out.aux_loss
        metrics = _reward_metrics(self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach(),
                                  chosen_avg.detach(), rejected_avg.detach())
        metrics |= {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()}
        return loss, metrics


@dataclass
class KTOObjective:
    """KTO on unpaired batches (`kto_label`, `kl_ids`/`kl_labels`; cached `ref_logps`/`ref_kl_logps`).

    The reference point z is the batch's mean log-ratio on the mismatched KL rows, clamped at 0
    and held constant (no gradient), as in the paper and trl. Metrics as trl: rewards/chosen is
    the mean implicit reward of the desirable rows, rewards/rejected of the undesirable ones
    (0 when the batch has none), `kl` the reference point.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ref_model: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "kto_label" not in batch.extras:
            raise ValueError("KTO needs unpaired batches (extras kto_label, kl_ids, kl_labels)")
        desirable = batch.extras["kto_label"].bool()
        kl_ids, kl_labels = batch.extras["kl_ids"], batch.extras["kl_labels"]
        logps, _, aux = _token_logps(model, batch.input_ids, batch.labels)
        with torch.no_grad():
            kl_logps = sequence_logps(model, kl_ids, kl_labels).float()
            if "ref_logps" in batch.extras:
                ref, ref_kl = batch.extras["ref_logps"].float(), batch.extras["ref_kl_logps"].float()
            elif self.ref_model is not None:
                ref = sequence_logps(self.ref_model, batch.input_ids, batch.labels).float()
                ref_kl = sequence_logps(self.ref_model, kl_ids, kl_labels).float()
            else:
                raise ValueError("KTO needs reference log-probs: cache them (cache_reference_logps) or give "
                                 "the objective a ref_model")
            kl = (kl_logps - ref_kl).mean().clamp(min=0)
        logratios = logps - ref
        losses = kto_losses(logratios, desirable, kl, beta=self.beta, desirable_weight=self.desirable_weight,
                            undesirable_weight=self.undesirable_weight)
        loss = losses.mean()
        if aux is not None:
            loss = loss + aux
        rewards, logps = self.beta * logratios.detach(), logps.detach()
        n_good, n_bad = desirable.sum().clamp(min=1), (~desirable).sum().clamp(min=1)
        good = desirable.to(rewards.dtype)
        chosen_reward, rejected_reward = (rewards * good).sum() / n_good, (rewards * (1 - good)).sum() / n_bad
        metrics = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                   "rewards/margins": chosen_reward - rejected_reward,
                   "logps/chosen": (logps * good).sum() / n_good,
                   "logps/rejected": (logps * (1 - good)).sum() / n_bad,
                   "kl": kl}
        return loss, metrics


@torch.no_grad()
def preference_metrics(model: nn.Module, objective: PreferenceObjective | KTOObjective, batches
                       ) -> dict[str, float]:
    """Mean loss and metrics over fixed batches (e.g. held-out `first_batches`), the model in eval mode."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    try:
        for batch in batches:
            device = next(model.parameters()).device
            loss, metrics = objective.loss(model, batch.to(device))
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("no batch to evaluate")
    return {key: value / count for key, value in sums.items()}
