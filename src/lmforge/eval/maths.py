"""Maths with exact-match answers: MMATH (MATH-500, AIME 2024/25, CNMO, ten languages) and
reasoning-gym's `gsm_symbolic` (GSM8K's test templates with fresh numbers).

The problems, the prompt and the grading are the verifiable tasks' (`lmforge.eval.verifiable`,
which GRPO and PPO train against, so a reward and a benchmark score cannot drift apart):
the chat prompt asks for a step-by-step solution with the final answer in ``\\boxed{}``;
`lmforge.eval.answers` extracts the answer (the last ``\\boxed{}``, else "the answer is",
``####``, else the last number) and compares it exactly (numbers as exact rationals,
other answers as normalised LaTeX). gsm_symbolic is graded by reasoning-gym's own
`score_answer`, counting only its full-credit answers as correct; its problems are the
held-out split, never drawn for training.

Greedy decoding gives `exact_match` (= pass@1). With `samples=n` and a temperature, each
problem gets n sampled solutions and the task reports the unbiased pass@k for each k <= n
(`lmforge.eval.generation.pass_at_k`) and the mean accuracy of a single sample.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.eval.generation import Generator, chat_context, generate, pass_at_k_metrics
from lmforge.eval.lm import Progress
from lmforge.eval.tasks import TaskResult, sample_items
from lmforge.eval.verifiable import SOURCES, MMathTask, Problem, ReasoningGymTask, Task

__all__ = ["GSMSymbolic", "MMath", "MathsTask"]

DEFAULT_GSM_PROBLEMS = 200  # gsm_symbolic is procedural: "all" is unbounded


class MathsTask:
    """A verifiable task scored by exact match; see the module docstring.

    `samples` completions per problem (1: greedy), drawn at `temperature`; `ks` the pass@k
    to report; `max_gen_toks` bounds a solution's length."""

    name = "maths"
    default_shots = 0

    def __init__(self, data: Sequence[Path] = (), *, samples: int = 1, temperature: float | None = None,
                 ks: Sequence[int] = (1, 10), max_gen_toks: int = 512) -> None:
        if data:
            raise ValueError(f"{self.name} reads its own packaged problems; it takes no --data")
        self.samples = samples
        self.temperature = (0.0 if samples == 1 else 0.8) if temperature is None else temperature
        self.ks = tuple(ks)
        self.max_gen_toks = max_gen_toks

    def task(self) -> Task:
        raise NotImplementedError

    def problems(self, task: Task, limit: int | None, seed: int) -> list[Problem]:
        raise NotImplementedError

    def run(self, model: Generator, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        if shots:
            raise ValueError(f"{self.name} is zero-shot (it asks for a boxed answer), not {shots}-shot")
        task = self.task()
        problems = self.problems(task, limit, seed)
        contexts = [(p.id, chat_context(model, p.prompt)) for p in problems]
        started = time.perf_counter()
        completions = generate(model, contexts, {"max_gen_toks": self.max_gen_toks}, samples=self.samples,
                               temperature=self.temperature, seed=seed, progress=progress)
        seconds = time.perf_counter() - started
        records, marks = [], []
        for problem, texts in zip(problems, completions):
            grades = [task.grade(problem, text) for text in texts]
            marks.append([g.correct for g in grades])
            records.append({"id": problem.id, "source": problem.metadata.get("source", self.name),
                            "question": problem.question, "gold": problem.answer,
                            "completions": texts, "answers": [g.answer for g in grades],
                            "correct": [g.correct for g in grades],
                            "formatted": [g.formatted for g in grades]})
        flat = [mark for m in marks for mark in m]
        metrics: dict[str, float] = {"exact_match": sum(flat) / len(flat)}
        if self.samples > 1:
            metrics.update(pass_at_k_metrics(marks, (k for k in self.ks if k <= self.samples)))
        metrics["format_rate"] = sum(f for r in records for f in r["formatted"]) / len(flat)
        metrics["problems"] = len(problems)
        info = {"shots": 0, "limit": limit, "seed": seed, "samples": self.samples,
                "temperature": self.temperature, "max_gen_toks": self.max_gen_toks, "seconds": seconds}
        return TaskResult(self.name, metrics, records, self.breakdown(records), info)

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        return {}


class MMath(MathsTask):
    """MMATH's 374 problems in one language (`lang`), optionally only some `sources`."""

    name = "mmath"

    def __init__(self, data: Sequence[Path] = (), *, lang: str = "en", sources: Sequence[str] | None = None,
                 **options: Any) -> None:
        super().__init__(data, **options)
        self.lang, self.sources = lang, tuple(sources) if sources else None

    def task(self) -> MMathTask:
        return MMathTask(lang=self.lang, sources=self.sources, quiet=True)

    def problems(self, task: MMathTask, limit: int | None, seed: int) -> list[Problem]:
        return sample_items(task.all_problems(), limit, seed)

    def breakdown(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        """exact_match per source (MATH500, AIME2024, ...): AIME is far harder than MATH-500."""
        table = {}
        for source in SOURCES:
            marks = [c for r in records if r["source"] == source for c in r["correct"]]
            if marks:
                table[source] = {"exact_match": sum(marks) / len(marks), "problems": len(marks)}
        return table


class GSMSymbolic(MathsTask):
    """reasoning-gym's gsm_symbolic, held-out problems (`limit` of them; 200 by default)."""

    name = "gsm_symbolic"

    def task(self) -> ReasoningGymTask:
        try:
            return ReasoningGymTask("gsm_symbolic")
        except ImportError:
            raise ValueError("gsm_symbolic needs reasoning-gym: pip install 'lmforge[eval]'") from None

    def problems(self, task: ReasoningGymTask, limit: int | None, seed: int) -> list[Problem]:
        return task.problems("test", limit or DEFAULT_GSM_PROBLEMS, seed)
