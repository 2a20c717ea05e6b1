"""The task contract and the registry: `lmforge eval --task NAME` finds its task here.

A task is a class built from the user's data files (`--data FILE...`, empty for the
packaged data) with a `run` that asks an `EvalModel` its questions and returns a
`TaskResult`: headline metrics (what `--json` prints), per-item records (what the
results file keeps, so a score can be traced to the questions behind it) and optional
breakdowns (MMLU's per-subject table). A new task plugs in by adding one line to
`REGISTRY`; the module is imported only when the task is asked for.

`run(model, *, shots, limit, seed, progress)`:
- `shots`: few-shot examples per prompt (None: the task's default);
- `limit`: score at most this many items, a sample drawn with `seed` (None: all);
- `seed`: every random choice of the task (subsets, few-shot draws, sampling);
- `progress(done, total)`: called as items finish (the CLI turns it into an ETA line).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lmforge.eval.lm import EvalModel, Progress

__all__ = ["REGISTRY", "Task", "TaskInfo", "TaskResult", "make_task", "sample_items", "task_options"]


@dataclass
class TaskResult:
    """What one task measured."""

    task: str
    metrics: dict[str, float]  # headline numbers: {"accuracy": 0.29, ...}
    records: list[dict[str, Any]] = field(default_factory=list)  # one per item scored
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. subject -> metrics
    info: dict[str, Any] = field(default_factory=dict)  # settings: shots, items, data, seconds ...

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "breakdown": self.breakdown, "info": self.info,
                "records": self.records}


class Task(Protocol):
    name: str

    def __init__(self, data: Sequence[Path] = ()) -> None: ...

    def run(self, model: EvalModel, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult: ...


@dataclass(frozen=True)
class TaskInfo:
    name: str
    target: str  # "module:Class", imported on first use
    description: str


REGISTRY: dict[str, TaskInfo] = {info.name: info for info in (
    TaskInfo("perplexity", "lmforge.eval.perplexity_task:PerplexityTask",
             "perplexity and bits per byte of text or token shards (--data FILE...; default: a held-out "
             "Python tutorial)"),
    TaskInfo("mmlu", "lmforge.eval.mmlu:MMLU",
             "MMLU, 57 subjects of 4-way multiple choice, lm-eval's prompt, scored by log-likelihood "
             "(--data FILE.jsonl for your own questions)"),
    TaskInfo("mmath", "lmforge.eval.maths:MMath",
             "MMATH: MATH-500, AIME 2024/25, CNMO (374 problems), boxed answers, exact match"),
    TaskInfo("gsm_symbolic", "lmforge.eval.maths:GSMSymbolic",
             "reasoning-gym gsm_symbolic, held-out problems (200 unless --limit), exact match"),
    TaskInfo("squad", "lmforge.eval.qa:SQuAD",
             "SQuAD v2 dev (11,873 questions, a third unanswerable), official EM and F1"),
    TaskInfo("hotpotqa", "lmforge.eval.qa:HotpotQA",
             "HotpotQA dev over its gold paragraphs (7,405 questions), official EM and F1"),
    TaskInfo("translation_de", "lmforge.eval.translation:TranslationDe",
             "English->German, the Debian handbook's paragraph pairs, sacrebleu BLEU and chrF"),
    TaskInfo("translation_es", "lmforge.eval.translation:TranslationEs",
             "English->Spanish, the Debian handbook's paragraph pairs, sacrebleu BLEU and chrF"),
    TaskInfo("humaneval", "lmforge.eval.code:HumanEval",
             "HumanEval (164 functions), greedy pass@1, tests run in a sandbox"),
    TaskInfo("humaneval_pass10", "lmforge.eval.code:HumanEvalSampled",
             "HumanEval, 10 samples at temperature 0.8: pass@1 and pass@10 (unbiased estimator)"),
    TaskInfo("mtbench", "lmforge.eval.judge:MTBench",
             "MT-Bench pairwise LLM-as-judge in both orders (judge: LMFORGE_JUDGE_URL; baseline: the "
             "judge's model, or --data FastChat answers)"),
)}


def make_task(name: str, data: Sequence[str | Path] = (), **options: Any) -> Task:
    """The registered task `name`, built over `data` (the user's files; empty: the packaged data),
    with `options` for its constructor (`lmforge eval --option KEY=VALUE`: e.g. hotpotqa's
    `distractors`, mmath's `lang`, humaneval's `samples`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, _, attr = REGISTRY[name].target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    known = task_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(known) or "none"
        raise ValueError(f"task {name} has no option {unknown[0]!r}; its options: {takes}")
    for key, value in options.items():
        _check_option(name, key, value, known[key])
    return cls([Path(p) for p in data], **options)


def _check_option(task: str, key: str, value: Any, annotation: str) -> None:
    """A typed value from the command line matches the option's plain type (see `task_options`)."""
    if value is None and annotation.endswith("| None"):
        return
    base = annotation.removesuffix(" | None")
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
    if base.startswith("Sequence["):
        inner = kinds[base[9:-1]]
        ok = isinstance(value, list) and all(isinstance(v, inner) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, kinds[base]) and (base == "bool" or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"task {task}: option {key} takes {base}, not {value!r}")


_PLAIN = re.compile(r"^(?:bool|int|float|str|Sequence\[(?:int|float|str)\])(?: \| None)?$")


def task_options(cls: type) -> dict[str, str]:
    """The options a task's constructor takes that a command line can give, with their types:
    keyword-only, of plain types (bool, int, float, str, or a sequence of them), its parents'
    included where it passes them on. (An MT-Bench judge endpoint, say, is built in code.)"""
    names: dict[str, str] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        for param in parameters:
            plain = isinstance(param.annotation, str) and _PLAIN.match(param.annotation)
            if param.kind is param.KEYWORD_ONLY and plain and param.name not in names:
                names[param.name] = param.annotation
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return names


T = TypeVar("T")


def sample_items(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """At most `limit` items, drawn with `seed`, kept in their original order (all for None).

    A seeded sample rather than the first N: the first 500 MMLU rows are three subjects."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]
