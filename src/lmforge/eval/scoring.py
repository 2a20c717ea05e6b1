"""Log-likelihoods of many token sequences at once: duplicates run once, shared prefixes run once,
the rest batched by length.

A request is a row of input tokens and the targets that its last positions predict (the
continuation; `lmforge.eval.lm` builds them as lm-eval does). The answer per request is
(sum of log p(target), whether every target is the argmax). Work saved, in order:

1. **Identical inputs run once.** MMLU's four answers " A".." D" are single tokens after the
   same context: the input (context + continuation[:-1]) is the same row for all four, so
   one forward pass scores all of them (lm-eval's "one-token continuation" cache, generalised).
2. **Shared prefixes run once.** Rows are sorted; neighbours whose first `min_shared` or
   more tokens agree, before any position that is scored, form a group. The common prefix
   goes through the model once, its keys and values are kept (`PrefixCache`), and the
   members' suffixes run as one batch that attends to them. A 5-shot prompt repeats the
   same five solved examples (~600 tokens) before every question of a subject; each
   question then costs only its own ~100 tokens.
3. **Everything else is batched by length**, longest first, right-padded up to
   `batch_tokens` tokens a batch: under causal attention a real token never sees the
   padding that comes after it, so padding changes no score.
4. **The LM head runs only where a target is scored** (`Transformer(logits_at=)`): over a
   49,152-token vocabulary the head is a fifth of a small model's work per position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.model.transformer import Transformer

Progress = Callable[[int, int], None]  # (requests done, requests in all)


class PrefixCache:
    """A KV cache holding one prefix that a batch of suffixes all attend to.

    First `record` mode: a forward pass over the prefix (batch 1) stores each layer's keys
    and values. Then `extend` mode: each layer's new keys and values (batch B) are
    returned after the prefix's, broadcast to the B rows without copying the prefix per row
    until attention needs it. Implements the model's `KVCache` protocol.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        before = torch.arange(self.length, device=positions.device).expand(positions.shape[0], -1)
        return torch.cat([before, positions], dim=1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length == 0:  # recording the prefix
            self.layers[layer] = (k, v)
            return k, v
        pk, pv = self.layers[layer]
        rows = (k.shape[0], -1, -1, -1)
        return torch.cat([pk.expand(rows), k], dim=2), torch.cat([pv.expand(rows), v], dim=2)

    def advance(self, positions: torch.Tensor) -> None:
        if self.length == 0:  # the prefix was just recorded; later (suffix) passes leave it as it is
            self.length = positions.shape[1]


@dataclass
class _Row:
    """One distinct input, and the requests (index, targets) scored on it."""

    tokens: tuple[int, ...]
    requests: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def first_scored(self) -> int:
        """The earliest position whose logits some request needs."""
        return len(self.tokens) - max(len(t) for _, t in self.requests)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _groups(rows: list[_Row], min_shared: int) -> tuple[list[tuple[int, list[_Row]]], list[_Row]]:
    """Sorted neighbours sharing >= min_shared tokens before their first scored position:
    (prefix length, members) groups, and the rows left alone."""
    rows = sorted(rows, key=lambda r: r.tokens)
    groups: list[tuple[int, list[_Row]]] = []
    alone: list[_Row] = []
    i = 0
    while i < len(rows):
        shared, members = rows[i].first_scored, [rows[i]]
        j = i + 1
        while j < len(rows):
            common = min(shared, _common_prefix(rows[i].tokens, rows[j].tokens), rows[j].first_scored)
            if common < min_shared:
                break
            shared = common
            members.append(rows[j])
            j += 1
        if len(members) > 1:
            groups.append((shared, members))
        else:
            alone.append(rows[i])
        i = j
    return groups, alone


def _batches(rows: list[_Row], batch_tokens: int, offset: int = 0) -> list[list[_Row]]:
    """Rows (longest first) in batches of at most `batch_tokens` padded tokens (at least one row each)."""
    rows = sorted(rows, key=lambda r: -len(r.tokens))
    batches: list[list[_Row]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * (len(batches[-1][0].tokens) - offset) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


class Scorer:
    """Scores requests through `model` (see the module docstring); `score` is the entry point."""

    def __init__(self, model: Transformer, *, batch_tokens: int = 4096, min_shared: int = 32,
                 pad_id: int = 0) -> None:
        self.model, self.batch_tokens, self.min_shared, self.pad_id = model, batch_tokens, min_shared, pad_id
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
              progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(sum log p(targets), all targets greedy) for each (input tokens, targets) request;
        the targets are predicted by the last len(targets) positions of the input."""
        rows: dict[tuple[int, ...], _Row] = {}
        for index, (tokens, targets) in enumerate(requests):
            if not targets or len(targets) > len(tokens):
                raise ValueError(f"request {index}: {len(targets)} targets for {len(tokens)} input tokens")
            key = tuple(int(t) for t in tokens)
            rows.setdefault(key, _Row(key)).requests.append((index, [int(t) for t in targets]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        done = 0
        groups, alone = _groups(list(rows.values()), self.min_shared)
        work = [(0, batch) for batch in _batches(alone, self.batch_tokens)]
        work += [(shared, batch) for shared, members in groups
                 for batch in _batches(members, self.batch_tokens, offset=shared)]
        cache, cached = None, None
        for shared, batch in work:
            if shared:
                prefix = batch[0].tokens[:shared]
                if prefix != cached:
                    cache, cached = self._prefill(prefix), prefix
            done += self._run(batch, shared, cache if shared else None, results)
            if progress is not None:
                progress(done, len(requests))
        return results  # type: ignore[return-value]

    def _prefill(self, prefix: tuple[int, ...]) -> PrefixCache:
        cache = PrefixCache()
        ids = torch.tensor([prefix], device=self.device)
        self.model(ids, positions=torch.arange(len(prefix), device=self.device)[None], cache=cache,
                   logits_for="last")
        return cache

    def _run(self, batch: list[_Row], shared: int, cache: PrefixCache | None,
             results: list[tuple[float, bool] | None]) -> int:
        """One forward pass over the rows' tokens after `shared`; fills their requests' results."""
        width = max(len(r.tokens) for r in batch) - shared
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        wanted = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, row in enumerate(batch):
            ids[b, :len(row.tokens) - shared] = torch.tensor(row.tokens[shared:])
            wanted[b, row.first_scored - shared:len(row.tokens) - shared] = True
        ids, wanted = ids.to(self.device), wanted.to(self.device)
        if cache is None:
            logits = self.model(ids, logits_at=wanted).logits
        else:
            positions = (shared + torch.arange(width, device=self.device)).expand(len(batch), -1)
            logits = self.model(ids, positions=positions, cache=cache, logits_at=wanted).logits
        start, count = 0, 0
        for row in batch:
            n = len(row.tokens) - row.first_scored
            row_logits = logits[start:start + n].float()
            start += n
            for index, targets in row.requests:
                part = row_logits[n - len(targets):]
                target = torch.tensor(targets, device=part.device)
                logp = torch.log_softmax(part, dim=-1).gather(1, target[:, None]).sum()
                greedy = bool((part.argmax(dim=-1) == target).all())
                results[index] = (float(logp), greedy)
                count += 1
        return count
