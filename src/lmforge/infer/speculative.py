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

Several requests at once: the draft keeps a cache slot per request and drafts for all of
them together (`Drafter.propose`: one batched draft forward per draft token); the engine
runs one verification forward over every request's [last token, k drafts] (rows of
different lengths, as any batch); `judge` then applies the rule to each request on its
own, with its own sampling settings, penalties and random generator, so a request's
tokens are the same whether it was speculated alone or beside others.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from lmforge.infer.cache import StaticKVCache
from lmforge.infer.runner import ModelRunner
from lmforge.infer.sampling import SamplingParams, TokenCounts, apply_penalties, draw, probabilities
from lmforge.model.transformer import Transformer


class Drafter:
    """The draft model, with a cache slot for each request it drafts for (up to `slots`)."""

    def __init__(self, model: Transformer, context: int, slots: int = 1) -> None:
        self.runner = ModelRunner(model.eval())
        self.cache = StaticKVCache.for_model(model, slots, context, lazy=True)
        self.cached: dict[Hashable, list[int]] = {}  # each owner's tokens whose keys/values its slot holds

    def forget(self, owner: Hashable) -> None:
        """Free an owner's slot (its request finished, or left the running batch)."""
        if self.cached.pop(owner, None) is not None:
            self.cache.free(owner)

    def truncate(self, owner: Hashable, n: int) -> None:
        """Keep the first `n` tokens of an owner's draft cache (the rest were rejected)."""
        self.cache.truncate(owner, n)
        del self.cached[owner][n:]

    def _place(self, owners: Sequence[Hashable]) -> list[int]:
        """Give every owner a slot, and free the slots of everyone else, so that the owners fill
        slots 0..B-1 (a batch is one run of slots); returns the owners' indices in slot order."""
        for other in [o for o in self.cached if o not in set(owners)]:
            self.forget(other)
        for owner in owners:
            if owner not in self.cached:
                self.cache.allocate(owner)
                self.cached[owner] = []
        return sorted(range(len(owners)), key=lambda i: self.cache.order(owners[i]))

    def _catch_up(self, owner: Hashable, tokens: list[int]) -> None:
        """Make the owner's draft cache hold exactly `tokens[:-1]`: keep what it shares with them
        (normally everything: it is truncated to the accepted tokens after each round), run the rest."""
        cached = self.cached[owner]
        common = 0
        while common < min(len(cached), len(tokens) - 1) and cached[common] == tokens[common]:
            common += 1
        self.truncate(owner, common)
        feed = tokens[common:-1]
        if feed:
            self.runner(torch.tensor([feed], device=self.runner.device), self.cache.view([owner]))
            cached += feed

    def propose(self, owners: Sequence[Hashable], tokens: Sequence[list[int]], k: Sequence[int],
                params: Sequence[SamplingParams], counts: Sequence[TokenCounts | None],
                generators: Sequence[torch.Generator | None],
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """k[i] draft tokens continuing row i's `tokens`, all rows drafted together (one batched draft
        forward per draft token, max(k) of them), and for each row the distributions q [k[i], V] they
        were drawn from (None when greedy: then only the argmax matters). A row that has its k[i]
        drafts draws nothing more (its random numbers are those it would use alone); the batch feeds
        it its last draft again, and its cache forgets what follows once the round is judged."""
        rows = self._place(owners)
        for i in rows:
            self._catch_up(owners[i], tokens[i])
        counts = [c.copy() if c is not None else None for c in counts]
        drafts: list[list[int]] = [[] for _ in owners]
        dists: list[list[torch.Tensor]] = [[] for _ in owners]
        feed = [tokens[i][-1] for i in rows]
        view_of = [owners[i] for i in rows]
        for step in range(max(k)):
            ids = torch.tensor(feed, device=self.runner.device)[:, None]
            logits = self.runner(ids, self.cache.view(view_of))
            sampled = []
            for row, i in enumerate(rows):
                self.cached[owners[i]].append(feed[row])
                if step >= k[i]:
                    continue
                if params[i].greedy:
                    feed[row] = int(apply_penalties(logits[row].float(), params[i], counts[i]).argmax())
                else:
                    dists[i].append(probabilities(logits[row], params[i], counts[i]))
                    sampled.append(row)
            if sampled:  # one random number from each sampled row's own generator
                picks = draw(torch.stack([dists[rows[r]][-1] for r in sampled]),
                             [generators[rows[r]] for r in sampled])
                for r, token in zip(sampled, picks.tolist()):
                    feed[r] = token
            for row, i in enumerate(rows):
                if step >= k[i]:
                    continue
                drafts[i].append(feed[row])
                if counts[i] is not None:
                    counts[i].add(feed[row])
        return drafts, [torch.stack(d) if d else None for d in dists]


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


def judge(drafter: Drafter, owner: Hashable, tokens: list[int], drafts: list[int], q: torch.Tensor | None,
          logits: torch.Tensor, params: SamplingParams, counts: TokenCounts | None,
          generator: torch.Generator | None) -> Round:
    """Step 3 for one request: `logits` [k + 1, V] are the model's at [tokens[-1], *drafts] (its
    verification forward, batched with other requests' by the engine); accept or reject the drafts.

    Afterwards the caller keeps `len(tokens) + accepted` tokens in the model's cache (the
    last token and the accepted drafts); the draft's cache is truncated to match here.
    """
    k = len(drafts)
    # the model's distribution at each position, with penalties seeing the drafts before it
    counts = counts.copy() if counts is not None else None
    p_rows = []
    for i in range(k + 1):
        row = apply_penalties(logits[i].float(), params, counts)
        p_rows.append(row if params.greedy else probabilities(row, params))  # penalties already applied
        if counts is not None and i < k:
            counts.add(drafts[i])
    p = torch.stack(p_rows)
    if q is None and not params.greedy:  # no drafts (k = 0): the next token is still drawn, not the argmax
        q = p[:0]
    accepted, following = accept_drafts(p, q, drafts, generator)
    drafter.truncate(owner, min(len(drafter.cached[owner]), len(tokens) + accepted))
    return Round([*drafts[:accepted], following], logits[:accepted + 1], proposed=k, accepted=accepted)
