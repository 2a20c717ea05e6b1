"""Rollouts: the policy answers prompts on lmforge's `Engine`, and the answers become training rows.

Reinforcement learning from rewards (PPO, GRPO) alternates two phases: *make experience*
(sample k completions per prompt with the current policy, score them) and *learn from it*
(a few epochs of gradient steps on that buffer). This module is the first phase, and the
`BatchSource` that feeds the second to the one `Trainer`.

**Sampling with the current weights.** Each round builds a fresh `Engine` over the policy
(the same module object the optimizer updates), so nothing the engine prepares can be
stale: the runner fuses q/k/v and gate/up into new matrices when it is built, and an
engine built after optimizer step n sees the weights of step n. A model whose trainable
parts the runner cannot run as they are (LoRA or (IA)^3 wrappers) is first merged into a
plain `Transformer` (`frozen_copy`): the merged layers are recomputed from the adapter's
current tensors every round, and every frozen tensor is shared, not copied. Building an
engine costs one fusion of the weights, which the first rollout step would pay anyway.

**Old log-probabilities are recomputed, not taken from the sampler.** The clipped
objective's ratio pi_theta / pi_old must be exactly the ratio of two evaluations of the
same function, so that it is 1 (and clipping idle, KL 0) before the first update. The
sampler's numbers are a different function: it draws from the tempered, top-k/top-p
truncated distribution, computed by the inference runner (fused matmuls, a C kernel, other
summation orders, possibly other precision). So after sampling, `token_logps` runs the
training forward (`Transformer.forward`, no grad) over prompt + completion, batched,
and log-softmaxes logits / temperature in fp32 (as trl does: the policy being optimised is
the tempered one; top-p truncation is not modelled, by trl either).

**Rows.** A rollout row is prompt + completion, right-padded, with labels in the SFT
convention of `Batch`: labels[t] is the token at t+1 where that token is part of the
completion, else IGNORE_INDEX. Per-token quantities (old log-probs, reference log-probs,
values, advantages) live at the same positions, so a labelled position t is "the policy
chose token t+1 having seen tokens 0..t".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model.transformer import Transformer
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.tune.ia3 import IA3Linear
from lmforge.tune.lora import LoRALinear


class RolloutError(ValueError):
    """A rollout setting or prompt set that cannot work (no prompts, a batch that does not divide)."""


RewardFn = Callable[[list[Any], list[str]], Sequence[float]]
"""reward_fn(prompts, completions) -> one float per completion (a reward model, or a task's checker)."""


def per_item(score: Callable[[Any, str], float]) -> RewardFn:
    """A batched reward function from one that scores a single (prompt, completion)."""
    return lambda prompts, completions: [float(score(p, c)) for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------------------------- the policy's weights
def disable_dropout(model: nn.Module) -> None:
    """Set every dropout to p=0 (as trl does for RL): with dropout, pi/pi_old would be noise, not 1."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _wrappers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, IA3Linear))}


@torch.no_grad()
def frozen_copy(model: nn.Module) -> Transformer:
    """A plain `Transformer` computing what `model` computes now, detached from training.

    LoRA/DoRA/(IA)^3 layers become ordinary linears holding their merged weights; every
    trainable tensor is copied; frozen tensors are shared (a LoRA policy's copy costs only
    its merged layers). Used for the reference model and for sampling a wrapped policy."""
    wrappers = _wrappers(model)
    if any(n in model._modules for n in ("prefix_tuning",)) or any(
            b._modules.get("attn_adapter") is not None for b in getattr(model, "blocks", [])):
        raise RolloutError("rollouts run full, LoRA, QLoRA, DoRA and (IA)^3 policies; a prefix or "
                           "bottleneck adapter cannot be merged into a plain model")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if any(key.startswith(w + ".") for w in wrappers):
            continue
        state[key] = tensor.detach().clone() if key in trainable else tensor.detach()
    for name, layer in wrappers.items():
        state[f"{name}.weight"] = layer.merged_weight().detach().clone()
        bias = layer.merged_bias() if isinstance(layer, IA3Linear) else layer.bias
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().clone()
    device = next(model.parameters()).device
    copy = Transformer.from_state_dict(model.config, state, device=device)
    return copy.requires_grad_(False).eval()


def sampling_model(policy: nn.Module) -> Transformer:
    """What the engine runs: the policy itself when the runner can read it directly (its weights
    are read when the engine is built), else a merged copy of its current weights."""
    return frozen_copy(policy) if _wrappers(policy) else policy


# ---------------------------------------------------------------------------------- sampling
@dataclass
class RolloutConfig:
    samples_per_prompt: int = 4  # k (GRPO's group size G)
    prompts_per_rollout: int = 8  # prompts per buffer: the buffer holds prompts * samples rows
    epochs: int = 1  # passes over each buffer (several updates per rollout batch)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings, besides the model's stop tokens
    max_batch_size: int = 64  # requests the engine runs at once
    logprob_batch: int = 16  # rows per no-grad forward when recomputing log-probs
    precision: Literal["fp32", "bf16"] = "fp32"  # of that forward: set it to the training's (train.precision)
    seed: int = 0

    def validate(self) -> None:
        for name in ("samples_per_prompt", "prompts_per_rollout", "epochs", "max_new_tokens",
                     "max_batch_size", "logprob_batch"):
            if getattr(self, name) < 1:
                raise RolloutError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16"):
            raise RolloutError(f"rollout.precision must be fp32 or bf16, got {self.precision!r}")
        if not self.temperature > 0:
            raise RolloutError(f"rollout.temperature must be > 0 (RL needs a sampled policy), got "
                               f"{self.temperature}")

    @property
    def rows(self) -> int:
        return self.samples_per_prompt * self.prompts_per_rollout


@dataclass
class Rollouts:
    """One round of sampling: row i answers `prompts[i]` (each prompt repeated k times, adjacent)."""

    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def rows(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) [N, T]: prompt + completion right-padded; labels on the completion only."""
        width = max(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))
        ids = torch.full((len(self.prompt_ids), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
        return ids, labels


def sample_rollouts(policy: nn.Module, prompts: Sequence[Any], prompt_ids: Sequence[Sequence[int]],
                    config: RolloutConfig, seeds: Sequence[int], *, tokenizer: Any = None,
                    stop_ids: Sequence[int] = ()) -> Rollouts:
    """`config.samples_per_prompt` completions of every prompt by `policy` as it is now, on a fresh `Engine`.

    `seeds[j]` seeds request j (prompt j // k), so a round is reproducible whatever the batching."""
    k = config.samples_per_prompt
    if len(seeds) != k * len(prompt_ids):
        raise RolloutError(f"need one seed per request ({k * len(prompt_ids)}), got {len(seeds)}")
    was_training = policy.training
    model = sampling_model(policy)
    requests = [list(p) for p in prompt_ids for _ in range(k)]
    engine = Engine(model, tokenizer, max_batch_size=min(len(requests), config.max_batch_size),
                    stop_ids=stop_ids)
    params = [SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                             seed=int(s), max_tokens=config.max_new_tokens, stop=tuple(config.stop))
              for s in seeds]
    started = time.perf_counter()
    try:
        done = engine.complete(requests, params)
    finally:
        policy.train(was_training)  # the engine put the model in eval mode
    seconds = time.perf_counter() - started
    return Rollouts(prompts=[p for p in prompts for _ in range(k)], prompt_ids=requests,
                    completion_ids=[c.token_ids for c in done], texts=[c.text for c in done],
                    finish_reasons=[c.finish_reason or "length" for c in done], seconds=seconds)


# ---------------------------------------------------------------------------------- log-probabilities
def label_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) per row of logits [n, V] (tempered, softmax in fp32) -> [n]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def position_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Per-position log-probs [B, T] from logits computed at `mask` only (`logits_at=mask`); 0 elsewhere."""
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return logps.masked_scatter(mask, label_logps(logits, labels[mask], temperature))


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The training loop's precision for a no-grad forward: the ratio pi/pi_old is 1 only if both
    sides are computed alike (bf16 autocast on one side alone would start it off by rounding noise)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                micro_batch: int = 16, precision: str = "fp32") -> torch.Tensor:
    """Per-token log-probs [N, T] fp32 of the labels under `model` (0 where unlabelled), batched.

    The LM head runs only on labelled positions (`Transformer.forward(logits_at=...)`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(labels.shape, dtype=torch.float32)
    try:
        for start in range(0, len(input_ids), micro_batch):
            ids = input_ids[start:start + micro_batch].to(device)
            lab = labels[start:start + micro_batch].to(device)
            mask = lab != IGNORE_INDEX
            with autocast_for(device, precision):
                logits = model(ids, logits_at=mask).logits
            rows = out[start:start + micro_batch]
            rows[mask.cpu()] = label_logps(logits, lab[mask], temperature).cpu()
    finally:
        model.train(was_training)
    return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------- the batch source
Prepare = Callable[[Rollouts], Batch]
"""Turns a round of rollouts into the buffer's rows: scores, old log-probs, advantages, ... as extras."""


class RolloutSource:
    """A `BatchSource` for RL: micro-batches of the current rollout buffer, a new buffer when it is spent.

    Each buffer is `prompts_per_rollout` prompts x `samples_per_prompt` samples, turned into
    rows by `prepare` (GRPO's or PPO's), then served `epochs` times, shuffled per epoch.
    `rows_per_step` (micro_batch x accumulation) lets each row carry `token_norm`, the
    completion tokens of its optimizer step divided by the step's micro-batches, so that a
    loss summed over a micro-batch's tokens and divided by it averages over every token of
    the step (trl's "dapo" aggregation) whatever the accumulation. Besides `prepare`'s
    extras, rows carry `completion_length`, `truncated` and `rollout_tokens_per_s` (logged).

    Prompts are drawn in a seeded order, pass after pass. The position (round, micro-batch)
    and the current buffer itself are the state: a run resumed mid-buffer trains on the
    very rows the interrupted run would have (they came from weights no longer at hand).
    """

    def __init__(self, policy: nn.Module, prompts: Sequence[Any], encode: Callable[[Any], Sequence[int]],
                 prepare: Prepare, config: RolloutConfig, *, tokenizer: Any = None,
                 stop_ids: Sequence[int] = (), rows_per_step: int | None = None, pad_id: int = 0) -> None:
        config.validate()
        if not prompts:
            raise RolloutError("no prompts to roll out")
        if rows_per_step is not None and config.rows % rows_per_step:
            raise RolloutError(f"a rollout buffer of {config.rows} rows (prompts_per_rollout x "
                               f"samples_per_prompt) must split into optimizer steps of {rows_per_step} rows")
        self.policy, self.prompts, self.encode, self.prepare = policy, list(prompts), encode, prepare
        self.config, self.tokenizer, self.stop_ids = config, tokenizer, list(stop_ids)
        self.rows_per_step, self.pad_id = rows_per_step, pad_id
        self.round = 0  # buffers made so far
        self.served = 0  # micro-batches served from the current buffer
        self.buffer: Batch | None = None
        self.last_rollouts: Rollouts | None = None

    # ------------------------------------------------------------------ making a buffer
    def _round_prompts(self, round_index: int) -> list[Any]:
        """The prompts of a round: consecutive slices of per-pass seeded permutations."""
        n, per = len(self.prompts), self.config.prompts_per_rollout
        chosen = []
        for index in range(round_index * per, (round_index + 1) * per):
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + index // n)
            order = torch.randperm(n, generator=generator)
            chosen.append(self.prompts[int(order[index % n])])
        return chosen

    def _round_seeds(self, round_index: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + round_index)
        return torch.randint(0, 2**62, (self.config.rows,), generator=generator).tolist()

    def make_buffer(self) -> Batch:
        prompts = self._round_prompts(self.round)
        rollouts = sample_rollouts(self.policy, prompts, [list(self.encode(p)) for p in prompts], self.config,
                                   self._round_seeds(self.round), tokenizer=self.tokenizer,
                                   stop_ids=self.stop_ids)
        batch = self.prepare(rollouts)
        n = batch.rows
        batch.extras["completion_length"] = torch.tensor([float(len(c)) for c in rollouts.completion_ids])
        batch.extras["truncated"] = torch.tensor([float(r == "length") for r in rollouts.finish_reasons])
        batch.extras["rollout_tokens_per_s"] = torch.full((n,), rollouts.tokens_per_s)
        self.last_rollouts = rollouts
        return batch

    # ------------------------------------------------------------------ serving
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 104_729 + self.round * 131 + epoch)
        return torch.randperm(self.config.rows, generator=generator)

    def next_batch(self, rows: int) -> Batch:
        total = self.config.rows
        if total % rows or (self.rows_per_step is not None and self.rows_per_step % rows):
            raise RolloutError(f"micro-batches of {rows} rows must divide the buffer ({total} rows) and the "
                               f"optimizer step ({self.rows_per_step} rows)")
        per_epoch = total // rows
        if self.buffer is None or self.served >= per_epoch * self.config.epochs:
            if self.buffer is not None:
                self.round += 1
            self.buffer, self.served = None, 0
            self.buffer = self.make_buffer()
        epoch, index = divmod(self.served, per_epoch)
        order = self._epoch_order(epoch)
        picked = order[index * rows:(index + 1) * rows]
        batch = _take(self.buffer, picked)
        step_rows = self.rows_per_step or rows
        first = index * rows // step_rows * step_rows
        step_labels = self.buffer.labels[order[first:first + step_rows]]
        tokens = (step_labels != IGNORE_INDEX).sum().clamp(min=1).float()
        batch.extras["token_norm"] = torch.full((rows,), float(tokens) * rows / step_rows)
        self.served += 1
        return _trim(batch)

    def first_batches(self, rows: int, max_batches: int) -> Iterator[Batch]:
        raise RolloutError("rollout batches have no fixed evaluation set; evaluate with rewards on held-out "
                           "prompts instead")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "served": self.served,
                "buffer": None if self.buffer is None else _batch_to_json(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.served = int(state["round"]), int(state["served"])
        self.buffer = None if state.get("buffer") is None else _batch_from_json(state["buffer"])


def _take(batch: Batch, index: torch.Tensor) -> Batch:
    return Batch(batch.input_ids[index], batch.labels[index], None,
                 {k: v[index] for k, v in batch.extras.items()})


def _trim(batch: Batch) -> Batch:
    """Drop the padding columns past the longest row of this micro-batch (less work per step)."""
    labelled = (batch.labels != IGNORE_INDEX).any(0).nonzero()
    width = int(labelled.max()) + 2 if len(labelled) else batch.input_ids.shape[1]
    width = min(width, batch.input_ids.shape[1])
    extras = {k: v[:, :width] if v.dim() == 2 and v.shape[1] == batch.input_ids.shape[1] else v
              for k, v in batch.extras.items()}
    return Batch(batch.input_ids[:, :width], batch.labels[:, :width], None, extras)


def _tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "values": t.reshape(-1).tolist()}


def _tensor_from_json(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(d["values"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


def _batch_to_json(batch: Batch) -> dict[str, Any]:
    """A buffer as plain JSON: ids exactly, fp32 values exactly (a float64 holds every float32)."""
    return {"input_ids": _tensor_to_json(batch.input_ids), "labels": _tensor_to_json(batch.labels),
            "extras": {k: _tensor_to_json(v) for k, v in batch.extras.items()}}


def _batch_from_json(d: dict[str, Any]) -> Batch:
    return Batch(_tensor_from_json(d["input_ids"]), _tensor_from_json(d["labels"]), None,
                 {k: _tensor_from_json(v) for k, v in d["extras"].items()})
