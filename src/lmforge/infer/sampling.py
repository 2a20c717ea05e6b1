"""Turning a row of logits into the next token.

The pipeline for one row, in order (the order of Hugging Face's `generate`):

1. **Penalties** on the raw logits. *Repetition* (CTRL, `repetition_penalty` r > 1):
   every token already in the prompt or the reply has its logit divided by r if positive,
   multiplied by r if negative, so it becomes less likely either way. *Frequency* and
   *presence* (OpenAI): a token generated c times so far loses `frequency_penalty * c +
   presence_penalty * (c > 0)` from its logit.
2. **Temperature** T: logits / T. Below 1 sharpens, above 1 flattens; 0 means greedy
   (argmax, after penalties), and then steps 3-5 are skipped.
3. **Top-k**: keep the k highest logits (ties with the k-th kept too).
4. **Top-p** (nucleus): keep the smallest set of most likely tokens whose probability
   reaches p (a token goes when the tokens ranked above it already sum to >= p).
5. **Min-p**: keep tokens whose probability is at least `min_p` times the top token's;
   the cut-off follows the model's confidence.
6. **Draw** from the softmax of what is left, with the request's own seeded
   `torch.Generator`, so a seed reproduces a reply whatever else is in the batch. The
   draw is by inverse CDF (`draw`): one uniform number u per row from that row's
   generator, and the token is the first whose cumulative probability exceeds u. A
   batch of rows is then one cumsum and one search, where `torch.multinomial` would
   make V random numbers per row (a millisecond for a 49K vocabulary on a CPU core).

Log-probabilities reported to the caller are those of the model itself (log-softmax of
the raw logits, before penalties and temperature), as OpenAI's API reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Sampling parameters outside their meaningful range."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int | None = 256  # None: until the context is full
    stop: tuple[str, ...] = ()  # strings that end the reply (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the reply, besides the model's own
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens
    logprobs: bool = False  # report each chosen token's log-probability
    top_logprobs: int = 0  # ... and this many most likely alternatives

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise SamplingError(message)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            value = getattr(self, name)
            need(math.isfinite(value), f"{name} must be a finite number, got {value}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            need(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}")
        need(self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}")
        need(self.top_logprobs >= 0, f"top_logprobs must be >= 0, got {self.top_logprobs}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        # lists are accepted for convenience; stored as tuples so params stay hashable and immutable
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: the batched fast path."""
        return self.greedy and not self.penalized and not self.logprobs and not self.top_logprobs


class TokenCounts:
    """What the penalties need to know about one sequence: which tokens it has seen
    (prompt and reply, for the repetition penalty) and how often each was generated."""

    def __init__(self, vocab_size: int, prompt_ids: Sequence[int],
                 device: torch.device | str = "cpu") -> None:
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1

    def copy(self) -> TokenCounts:
        new = object.__new__(TokenCounts)
        new.seen, new.counts = self.seen.clone(), self.counts.clone()
        return new


def apply_penalties(logits: torch.Tensor, params: SamplingParams, counts: TokenCounts | None) -> torch.Tensor:
    """[..., V] fp32 logits with the repetition, frequency and presence penalties applied."""
    if counts is None or not params.penalized:
        return logits
    if params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        logits = torch.where(counts.seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if params.frequency_penalty or params.presence_penalty:
        c = counts.counts
        logits = logits - params.frequency_penalty * c - params.presence_penalty * (c > 0)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] logits -> tempered logits with everything outside top-k / top-p / min-p at -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams,
                  counts: TokenCounts | None = None) -> torch.Tensor:
    """The distribution a token is actually drawn from ([..., V], fp32); one-hot when greedy.

    Speculative decoding needs it explicitly: its accept/reject rule compares the
    target's and the draft's versions of exactly this distribution.
    """
    logits = apply_penalties(logits.float(), params, counts)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, params).softmax(-1)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[B, V] probabilities (or any non-negative weights) -> [B] token ids, row i drawn with
    `generators[i]` by inverse CDF: exact sampling that costs each row one random number."""
    if probs.dim() != 2 or probs.shape[0] != len(generators):
        raise ValueError(f"draw needs [B, V] probabilities and B generators, got {tuple(probs.shape)} "
                         f"and {len(generators)}")
    u = torch.stack([torch.rand((), generator=g, device=probs.device, dtype=torch.float64)
                     for g in generators])
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all() and (total > 0).all() and (probs >= 0).all()):
        raise ValueError("cannot sample: a row of probabilities is negative, NaN, infinite or all zero "
                         "(the model produced non-finite logits?)")
    # the first token whose cumulative probability exceeds u (scaled to the row's total, so
    # rounding cannot leave u past the end); zero-probability tokens add nothing and are never it
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           counts: TokenCounts | None = None) -> torch.Tensor:
    """[B, V] -> [B] next token ids (all rows with the same parameters and generator)."""
    logits = apply_penalties(logits.float(), params, counts)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return draw(probs, [generator] * probs.shape[0])


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[TokenLogprob]]:
    """The model's log-probability of `token` and its `top` most likely alternatives, for one row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[TokenLogprob] = []
    if top:
        values, ids = logp.topk(min(top, logp.shape[-1]))
        alternatives = [TokenLogprob(i, v) for i, v in zip(ids.tolist(), values.tolist())]
    return float(logp[token]), alternatives
