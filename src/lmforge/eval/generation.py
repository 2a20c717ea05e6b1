"""What the generation-scored tasks (maths, QA, translation, code, judge) share: asking for
completions, n samples each, and pass@k.

**Samples and seeds.** Greedy decoding gives one completion per item. pass@k needs n >= k
sampled completions per item; each (item, sample) pair gets its own seed, derived from the
run's seed and the item's id, so a completion reproduces whatever else shares the batch
(the engine draws each request from its own generator) and whichever `--limit` chose it.

**pass@k** (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the
chance that at least one of k completions is correct. Drawing k of the n generated ones
without replacement, the chance that all k are wrong is C(n-c, k) / C(n, k) for c correct,
so the unbiased estimate is

    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)

(the product form avoids the huge binomials). Taking the best of k *fixed* samples, or
1 - (1 - c/n)^k, are biased; with n = k the estimate is simply "any of the k correct".
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["Generator", "chat_context", "generate", "pass_at_k", "pass_at_k_metrics", "request_seed"]

Message = dict[str, str]


class Generator(Protocol):
    """What a generation task asks of a model: `EvalModel`'s (and lm-eval's) `generate_until`,
    and a tokenizer that renders chat messages with the model's template."""

    tokenizer: Any

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], *,
                       progress: Any = None) -> list[str]: ...


def chat_context(model: Generator, messages: Sequence[Message]) -> str:
    """The prompt text of a conversation in the model's chat template, the assistant's turn opened
    (a model without a template gets ChatML, as `lmforge chat` does)."""
    return model.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)


def request_seed(seed: int, item_id: str, sample: int) -> int:
    """A generator seed for one sample of one item, independent of its place in the batch."""
    return random.Random(f"{seed}/{item_id}/{sample}").randrange(2**63)


def generate(model: Generator, contexts: Sequence[tuple[str, str]], gen_kwargs: dict[str, Any], *,
             samples: int = 1, temperature: float = 0.0, seed: int = 0, progress: Any = None
             ) -> list[list[str]]:
    """`samples` completions of each (item id, context): greedy when `temperature` is 0 (then
    `samples` must be 1), else sampled at `temperature` with one seed per (item, sample).
    All requests go to the model at once, so the engine batches them continuously."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and samples > 1:
        raise ValueError(f"greedy decoding (temperature 0) gives one completion, not {samples}: "
                         f"give a temperature > 0 to sample several")
    requests = []
    for item_id, context in contexts:
        for k in range(samples):
            kwargs = dict(gen_kwargs, do_sample=temperature > 0, temperature=temperature)
            if temperature > 0:
                kwargs["seed"] = request_seed(seed, item_id, k)
            requests.append((context, kwargs))
    report = None
    if progress is not None:
        report = lambda done, total: progress(done // samples, total // samples)
    texts = model.generate_until(requests, progress=report)
    return [texts[i * samples:(i + 1) * samples] for i in range(len(contexts))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n completions of which c are correct (see the module docstring)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct completions must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} completions per item, got n={n}")
    if n - c < k:  # fewer than k wrong ones: every draw of k holds a correct one
        return 1.0
    survive = 1.0
    for i in range(n - c + 1, n + 1):
        survive *= 1.0 - k / i
    return 1.0 - survive


def pass_at_k_metrics(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """{"pass@k": mean over items} for each k no larger than the fewest samples of an item."""
    if not correct:
        raise ValueError("no items to score")
    n = min(len(marks) for marks in correct)
    return {f"pass@{k}": sum(pass_at_k(len(m), sum(m), k) for m in correct) / len(correct)
            for k in ks if k <= n}
