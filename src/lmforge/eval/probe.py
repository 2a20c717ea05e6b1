"""Benchmark tasks inside training: the trainer's `probe`, scoring the model as it learns.

A loss curve says the model fits its data; a task curve says whether that buys anything
a user wants (MMLU accuracy, perplexity on text never trained on, maths answers). At each
evaluation point the `Trainer` calls the probe with the model as it is; the probe wraps it
in an `EvalModel` (no copy of the weights: the engine reads them in place) and runs each
`lmforge eval` task on the same seeded sample of `limit` items, so two points of the curve
differ only by training, not by which questions were drawn. Scores land in metrics.jsonl
as `eval/<task>/<metric>` and in metrics.png beside the loss.

Tasks are built once (their data read and indexed once); only the float scores are kept
(counts such as `questions` would flatten the plot's scale). A sample of 50 keeps each
point cheap; its standard error (about 0.07 for an accuracy near 0.5) is what a curve
of 50-item points can resolve, so raise `train.eval_task_limit` to see small changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.eval.lm import EvalModel
from lmforge.eval.tasks import REGISTRY, Task, make_task
from lmforge.infer.loading import stop_ids

__all__ = ["TaskProbe", "probe_for"]


class TaskProbe:
    """Runs `lmforge eval` tasks on a training model: `probe(model, tokenizer) -> {"eval/task/metric": x}`."""

    def __init__(self, names: list[str], *, limit: int = 50, seed: int = 0, shots: int | None = None) -> None:
        unknown = [name for name in names if name not in REGISTRY]
        if unknown:
            raise ValueError(f"train.eval_tasks: unknown task(s) {unknown}; known: "
                             f"{', '.join(sorted(REGISTRY))}")
        if limit < 1:
            raise ValueError(f"train.eval_task_limit must be at least 1, got {limit}")
        self.tasks: list[Task] = [make_task(name) for name in names]
        self.limit, self.seed, self.shots = limit, seed, shots

    def __call__(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        if tokenizer is None:
            raise ValueError("train.eval_tasks needs the run's tokenizer, and this run has none")
        was_training = model.training
        scores: dict[str, float] = {}
        try:
            with torch.inference_mode():
                subject = EvalModel(model, tokenizer, stop_ids=stop_ids(tokenizer))  # type: ignore[arg-type]
                for task in self.tasks:
                    result = task.run(subject, shots=self.shots, limit=self.limit, seed=self.seed)
                    scores |= {f"eval/{task.name}/{metric}": value for metric, value in result.metrics.items()
                               if isinstance(value, float)}
        finally:
            model.train(was_training)
        return scores


def probe_for(train_config: Any, *, seed: int = 0) -> TaskProbe | None:
    """The probe a run's `train` section asks for (`eval_tasks`, `eval_task_limit`), or None."""
    names = list(getattr(train_config, "eval_tasks", None) or [])
    if not names:
        return None
    return TaskProbe(names, limit=train_config.eval_task_limit, seed=seed)
