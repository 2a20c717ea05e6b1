"""Beam search: keep the `width` most probable partial replies instead of one.

Greedy decoding commits to the best token at every step; a token that looks slightly
worse now may lead to a much better sequence. Beam search keeps `width` candidates
(beams). Each step extends every beam by every token, scores each extension by its total
log-probability, and keeps the best `width` extensions that have not ended. An extension
that ends (an end-of-sequence token) becomes a finished hypothesis, scored

    score = sum of log-probabilities / (generated length ** length_penalty)

because a raw sum always favours short replies (every token adds a negative number).
length_penalty > 1 favours longer replies, < 1 shorter ones, 0 is the raw sum. The
search stops when `width` hypotheses are finished and no running beam can still beat the
worst of them (or at once with `early_stopping`), or after `max_tokens`.

Use it when there is one right answer and the model is sure of it only as a whole
(translation, summarisation, constrained formats); for open-ended chat it produces
bland, repetitive text, and sampling is better. Cost: `width` sequences are decoded as
one batch, and the KV cache rows are reordered to follow their parents every step.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from lmforge.infer.cache import StaticKVCache
from lmforge.infer.runner import ModelRunner


@dataclass
class Hypothesis:
    token_ids: list[int]  # the reply, including the end token if it ended with one
    logprob: float  # total log-probability of the reply
    score: float  # logprob / len ** length_penalty
    finish_reason: str  # "stop" or "length"


@torch.inference_mode()
def beam_search(runner: ModelRunner, prompt_ids: Sequence[int], *, width: int, max_tokens: int,
                length_penalty: float = 1.0, stop_ids: Collection[int] = (),
                early_stopping: bool = False) -> list[Hypothesis]:
    """The best `width` hypotheses, best first."""
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    device = runner.device
    cache = StaticKVCache.for_model(runner.model, width, len(prompt_ids) + max_tokens, lazy=True)
    for b in range(width):
        cache.allocate(b)

    def score(logprob: float, length: int) -> float:
        return logprob / (length ** length_penalty)

    finished: list[Hypothesis] = []
    # prefill once in slot 0; the first expansion copies it to every beam
    logits = runner(torch.tensor([list(prompt_ids)], device=device), cache.view([0]))
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for step in range(max_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)  # [beams, V]
        totals = logp + torch.tensor([lp for _, lp in beams], device=device)[:, None]
        values, flat = totals.view(-1).topk(min(2 * width, totals.numel()))
        vocab = logp.shape[-1]
        next_beams, parents = [], []
        for value, index in zip(values.tolist(), flat.tolist()):
            parent, token = divmod(index, vocab)
            tokens = beams[parent][0] + [token]
            if token in stop_ids:
                if len(finished) < width or score(value, len(tokens)) > finished[-1].score:
                    finished.append(Hypothesis(tokens, value, score(value, len(tokens)), "stop"))
                    finished.sort(key=lambda h: -h.score)
                    del finished[width:]
                continue
            next_beams.append((tokens, value))
            parents.append(parent)
            if len(next_beams) == width:
                break
        beams = next_beams
        if len(finished) == width:
            if early_stopping:
                break
            # a running beam only loses log-probability; with length_penalty > 0 its best
            # possible score is reached at max length, and with <= 0 right now
            best_len = step + 1 + (max_tokens - step - 1 if length_penalty > 0 else 0)
            if all(score(lp, best_len) <= finished[-1].score for _, lp in beams):
                break
        if step == max_tokens - 1 or not beams:
            break
        cache.reorder(parents + [parents[0]] * (width - len(parents)))
        last = [[t[-1]] for t, _ in beams]
        ids = torch.tensor(last + last[:1] * (width - len(beams)), device=device)
        logits = runner(ids, cache.view(list(range(width))))[: len(beams)]
    for tokens, lp in beams:
        finished.append(Hypothesis(tokens, lp, score(lp, len(tokens)), "length"))
    finished.sort(key=lambda h: -h.score)
    return finished[:width]
