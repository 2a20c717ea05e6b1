"""Speculative decoding: a small draft model guesses, the model checks k guesses at once.

A decode step is limited by reading the weights, not by arithmetic, so running the model
on k+1 tokens costs about as much as on one. Speculative decoding exploits this (Leviathan
et al. 2023; Chen et al. 2023):

1. The draft model proposes k tokens d_1..d_k autoregressively, drawing each d_i from its
   own (processed) distribution q_i.
2. The model runs once over [last token, d_1, ..., d_k] and so gets its distributions
   p_1..p_{k+1} at every one of those positions.
3. For i = 1..k: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)). At the first
   rejection, draw the replacement from the residual r(x) ∝ max(0, p_i(x) - q_i(x)) and
   stop. If all k are accepted, draw a bonus token from p_{k+1}.

Why the output follows p exactly: the chance of emitting token x at a position is
q(x) min(1, p(x)/q(x)) (proposed and accepted) + P(reject) r(x) (replaced). The first
term is min(q(x), p(x)); P(reject) = 1 - sum_x min(p, q) = sum_x max(0, p - q), which is
exactly the normaliser of r, so the second term is max(0, p(x) - q(x)). Their sum is
min(p, q) + max(0, p - q) = p(x). With greedy decoding p is one-hot on the model's argmax:
a guess is kept exactly when it *is* the argmax, so the tokens are identical to greedy
decoding with the model alone.

Each round emits between 1 and k+1 tokens for one forward of the model plus k of the
draft. The acceptance rate (accepted / proposed) measures how well the draft predicts the
model; the speed-up is about (accepted per round + 1) / (1 + k * draft cost / model cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.infer.cache import StaticKVCache
from lmforge.infer.runner import ModelRunner
from lmforge.infer.sampling import SamplingParams, TokenCounts, apply_penalties, draw, probabilities
from lmforge.model.transformer import Transformer

# The model under test, as the engine runs it: token ids [1, k + 1] -> logits [k + 1, V]
# for one request whose cache holds every token but the last.
Verifier = Callable[[torch.Tensor], torch.Tensor]

_DRAFT = "draft"


class Drafter:
    """The draft model, with a one-sequence cache that follows the request being decoded."""

    def __init__(self, model: Transformer, context: int) -> None:
        self.runner = ModelRunner(model.eval())
        self.cache = StaticKVCache.for_model(model, 1, context, lazy=True)
        self.cache.allocate(_DRAFT)
        self.owner: int | None = None
        self.cached: list[int] = []  # the tokens whose keys/values the draft cache holds

    def forget(self, owner: int) -> None:
        if self.owner == owner:
            self.truncate(0)
            self.owner = None

    def truncate(self, n: int) -> None:
        """Keep the draft cache's first `n` tokens (the rest were rejected or belong to another request)."""
        self.cache.truncate(_DRAFT, n)
        del self.cached[n:]

    def propose(self, owner: int, tokens: list[int], k: int, params: SamplingParams,
                counts: TokenCounts | None,
                generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor | None]]:
        """k draft tokens continuing `tokens`, and the distribution q_i each was drawn from
        (None when greedy: then only the argmax matters)."""
        if self.owner != owner:
            self.truncate(0)
            self.owner = owner
        common = 0  # normally the whole cache: it is truncated to the accepted tokens after each round
        while common < len(self.cached) and self.cached[common] == tokens[common]:
            common += 1
        self.truncate(min(common, len(tokens) - 1))
        feed = tokens[len(self.cached):]
        counts = counts.copy() if counts is not None else None
        drafts: list[int] = []
        dists: list[torch.Tensor | None] = []
        for _ in range(k):
            ids = torch.tensor([feed], device=self.runner.device)
            logits = self.runner(ids, self.cache.view([_DRAFT]))[0]
            self.cached += feed
            if params.greedy:
                token = int(apply_penalties(logits.float(), params, counts).argmax())
                dists.append(None)
            else:
                q = probabilities(logits, params, counts)
                token = int(draw(q[None], [generator]))
                dists.append(q)
            drafts.append(token)
            if counts is not None:
                counts.add(token)
            feed = [token]
        return drafts, dists


def accept_drafts(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                  generator: torch.Generator | None = None) -> tuple[int, int]:
    """The accept/reject rule: (how many drafts are accepted, the token that follows them).

    `p` [k+1, V] holds the model's distributions at the k draft positions and the one
    after; `q` [k, V] the draft's. With `q=None` (greedy) a draft is accepted exactly when
    it is the argmax of p, and the next token is that argmax.
    """
    for i, d in enumerate(drafts):
        if q is None:
            best = int(p[i].argmax())
            if best != d:
                return i, best
            continue
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, d] >= p[i, d]:  # rejected, with probability 1 - min(1, p(d) / q(d))
            residual = (p[i] - q[i]).clamp(min=0)
            weights = residual if residual.sum() > 0 else p[i]
            return i, int(draw(weights[None], [generator]))
    last = p[len(drafts)]  # every draft accepted: a bonus token from the model's next distribution
    if q is None:
        return len(drafts), int(last.argmax())
    return len(drafts), int(draw(last[None], [generator]))


@dataclass
class Round:
    """One speculative round's outcome for a request."""

    tokens: list[int]  # accepted drafts, then the correction or bonus token
    logits: torch.Tensor  # the model's raw logits for each of `tokens`
    proposed: int
    accepted: int


def speculative_round(drafter: Drafter, verify: Verifier, owner: int, tokens: list[int], k: int,
                      params: SamplingParams, counts: TokenCounts | None,
                      generator: torch.Generator | None) -> Round:
    """One round for a request whose model cache holds `tokens[:-1]`: draft k, verify once, accept.

    Afterwards the caller keeps `len(tokens) + accepted` tokens in the model's cache (the
    last token and the accepted drafts); the draft's cache is truncated to match here.
    """
    cached = len(tokens) - 1  # the last token is not yet in the model's cache
    drafts, q_rows = drafter.propose(owner, tokens, k, params, counts, generator)
    logits = verify(torch.tensor([[tokens[-1], *drafts]], device=drafter.runner.device))  # [k + 1, V]
    # the model's distribution at each position, with penalties seeing the drafts before it
    counts = counts.copy() if counts is not None else None
    p_rows = []
    for i in range(k + 1):
        row = apply_penalties(logits[i].float(), params, counts)
        p_rows.append(row if params.greedy else probabilities(row, params))  # penalties already applied
        if counts is not None and i < k:
            counts.add(drafts[i])
    q = None if params.greedy else torch.stack(q_rows)
    accepted, following = accept_drafts(torch.stack(p_rows), q, drafts, generator)
    drafter.truncate(min(len(drafter.cached), cached + 1 + accepted))
    return Round([*drafts[:accepted], following], logits[:accepted + 1], proposed=k, accepted=accepted)
