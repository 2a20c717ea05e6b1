"""Verifiable tasks: problems with gold answers, and a programmatic reward for a completion.

GRPO, PPO with a programmatic reward, on-policy preference pairs and held-out evaluation
all need the same three things, which a `Task` gives:

- `problems(split, n, seed)`: `Problem`s (an id, the question, the gold answer, and the
  chat `prompt`: a system message asking for the final answer in ``\\boxed{}``, then the
  question);
- `grade(problem, completion)`: the answer extracted from the completion
  (`lmforge.eval.answers`), the task's own score for it, whether that is correct, and
  whether the answer came in the asked-for format;
- `reward(problem, completion)`: ``score + format_weight * formatted``. The second term is
  an optional, separate shaping bonus (default 0; 0.1 is typical) for writing the answer in
  ``\\boxed{...}``, which a small model must learn before its answers can be read
  reliably; it is paid whether or not the answer is right, so keep it small.

**Held-out problems are never trained on.** A procedural task (reasoning-gym) draws a
problem from an integer key; train keys lie in [0, 2^31), test keys in [2^31, 2^32), so
ids never coincide. Different keys can still produce the same problem ("1 + 5"), so the
split is also decided by the problem itself: a stable hash of its identity (the
arithmetic expression where reasoning-gym records one, so that two phrasings of one sum
are one problem; else the question text) puts one problem in `HOLDOUT_EVERY` on the test
side, and each split keeps only its own. A problem is therefore on one side for every
seed, `n`, key and phrasing, and a training run cannot meet a test problem, whatever it
asks for. (gsm_symbolic's problems come from GSM8K templates: a test problem is a new
instance, numbers and names drawn afresh, of a template that training also sees.)

Tasks (`get_task(name, **options)`):

- ``gsm_symbolic``, ``basic_arithmetic``, ``chain_sum``: reasoning-gym 0.1.25 generators,
  options are their config fields (``max_terms=3``); scored by the dataset's own
  `score_answer` on the extracted answer in canonical form ("1,200.00" -> "1200"), which
  gives 1.0 when right and, by reasoning-gym's design, partial credit when not
  (gsm_symbolic: 0.01 for any number; basic_arithmetic: len(gold)/len(answer) when the
  answer contains the gold, e.g. 0.67 for "-12" against "12"). `Grade.correct` is score 1.0;
  ``partial_credit=False`` makes the score 1 or 0 (a reward that pays nothing for "-12").
- ``mmath``: MMATH's 374 competition problems (`lmforge.eval.mmath`), evaluation only;
  options ``lang`` and ``sources``; scored 1/0 by `answers_match`.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from lmforge.eval.answers import answers_match, canonical_answer, extract_answer, has_boxed_answer
from lmforge.eval.mmath import LANGUAGES, SOURCES, load_mmath

__all__ = ["HOLDOUT_EVERY", "REASONING_GYM_TASKS", "SPLITS", "SYSTEM_PROMPT", "TASKS", "Grade", "MMathTask",
           "Problem", "ReasoningGymTask", "Task", "TaskError", "get_task", "problem_identity", "split_of"]

Message = dict[str, str]

SPLITS = ("train", "test")  # "test": the held-out problems
HOLDOUT_EVERY = 10  # one problem in ten is held out
SYSTEM_PROMPT = ("Solve the problem step by step. Put your final answer within \\boxed{}, "
                 "for example \\boxed{42}.")
_KEY_RANGE = {"train": (0, 2**31), "test": (2**31, 2**32)}


class TaskError(ValueError):
    """A task asked for something it cannot give: an unknown name, option or split, too many problems."""


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` is what the model reads (chat messages), `answer` the gold final answer."""

    id: str
    question: str
    answer: str
    prompt: list[Message]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grade:
    """How a completion did: its extracted answer, the task's score in [0, 1], correct (score 1),
    and whether the answer was given in the asked-for format (a closed ``\\boxed{}``)."""

    answer: str | None
    score: float
    correct: bool
    formatted: bool


def chat_prompt(question: str) -> list[Message]:
    """The system instruction (final answer in ``\\boxed{}``), then the question."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


class Task(ABC):
    """Problems with gold answers and a reward; see the module docstring."""

    name: str
    splits: tuple[str, ...] = SPLITS

    def __init__(self, *, format_weight: float = 0.0) -> None:
        if not 0.0 <= format_weight <= 1.0:
            raise TaskError(f"format_weight must be in [0, 1], got {format_weight}")
        self.format_weight = format_weight

    @abstractmethod
    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """`n` distinct problems of `split`, the same ones for the same (split, n, seed)."""

    @abstractmethod
    def grade(self, problem: Problem, completion: str) -> Grade:
        """Score a completion of `problem`'s prompt."""

    def reward(self, problem: Problem, completion: str) -> float:
        """The task's score, plus `format_weight` if the answer is in ``\\boxed{}`` (module docstring)."""
        grade = self.grade(problem, completion)
        return grade.score + self.format_weight * grade.formatted

    def _check(self, split: str, n: int) -> None:
        if split not in self.splits:
            if split in SPLITS:
                raise TaskError(f"{self.name} has no {split} split (it has: {', '.join(self.splits)})")
            raise TaskError(f"unknown split {split!r}; known: {', '.join(SPLITS)} (test = held out)")
        if not isinstance(n, int) or n < 1:
            raise TaskError(f"n must be a positive number of problems, got {n!r}")


def split_of(identity: str) -> str:
    """The split a problem belongs to, from a stable hash of what identifies it (`problem_identity`):
    "test" for one problem in `HOLDOUT_EVERY`, else "train"."""
    bucket = int.from_bytes(hashlib.sha256(identity.encode("utf-8")).digest()[:8], "big") % HOLDOUT_EVERY
    return "test" if bucket == 0 else "train"


def problem_identity(entry: dict[str, Any]) -> str:
    """What makes two reasoning-gym problems the same problem: the arithmetic expression where there
    is one (so "What is 3 + 4?" and "Compute 3+4." are one problem), else the question text;
    whitespace and case do not count."""
    expression = entry.get("metadata", {}).get("expression")
    if expression:
        return "expression:" + re.sub(r"\s+", "", str(expression))
    return "question:" + re.sub(r"\s+", " ", entry["question"]).strip().casefold()


# ============================================================================ reasoning-gym
REASONING_GYM_TASKS = ("gsm_symbolic", "basic_arithmetic", "chain_sum")


class ReasoningGymTask(Task):
    """A reasoning-gym procedural dataset: problem `key` is its generator run with seed `key`."""

    def __init__(self, dataset: str, *, format_weight: float = 0.0, partial_credit: bool = True,
                 **config: Any) -> None:
        super().__init__(format_weight=format_weight)
        self.partial_credit = partial_credit
        from reasoning_gym.factory import DATASETS, create_dataset

        if dataset not in DATASETS:
            raise TaskError(f"reasoning-gym has no dataset {dataset!r}")
        allowed = sorted(f.name for f in fields(DATASETS[dataset][1]) if f.name not in ("seed", "size"))
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise TaskError(f"{dataset} has no option {', '.join(unknown)}; "
                            f"its options: {', '.join(allowed)}")
        self.name, self.config = dataset, dict(config)
        try:  # reasoning-gym validates with assert: turn a bad value into a TaskError here, once
            self._scorer = create_dataset(dataset, **config, seed=0, size=1)
        except (AssertionError, TypeError, ValueError) as err:
            reason = err or "rejected by its validate()"
            raise TaskError(f"bad {dataset} options {config}: {reason}") from None
        self._create = create_dataset

    def entry(self, key: int) -> dict[str, Any]:
        """reasoning-gym's item for `key`: {"question", "answer", "metadata"}."""
        return self._create(self.name, **self.config, seed=key, size=1)[0]

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        self._check(split, n)
        low, high = _KEY_RANGE[split]
        rng = random.Random(f"{self.name}/{split}/{seed}")  # a str seed is hashed with sha512: stable
        keys: set[int] = set()
        identities: set[str] = set()
        problems: list[Problem] = []
        attempts = 20 * HOLDOUT_EVERY * n + 1000
        for _ in range(attempts):
            key = rng.randrange(low, high)
            if key in keys:
                continue
            keys.add(key)
            entry = self.entry(key)
            identity = problem_identity(entry)
            if split_of(identity) != split or identity in identities:
                continue
            identities.add(identity)
            problems.append(Problem(
                id=f"{self.name}/{key}", question=entry["question"], answer=str(entry["answer"]),
                prompt=chat_prompt(entry["question"]),
                metadata={"task": self.name, "split": split, "key": key, "entry": entry}))
            if len(problems) == n:
                return problems
        raise TaskError(f"{self.name} with {self.config or 'its defaults'} gave only {len(problems)} "
                        f"distinct {split} problems in {attempts} draws, not {n}: ask for fewer or "
                        f"widen its options")

    def grade(self, problem: Problem, completion: str) -> Grade:
        answer = extract_answer(completion)
        entry = problem.metadata.get("entry") or self.entry(problem.metadata["key"])
        score = float(self._scorer.score_answer(canonical_answer(answer), entry))
        correct = score >= 1.0
        return Grade(answer=answer, score=score if self.partial_credit else float(correct), correct=correct,
                     formatted=has_boxed_answer(completion))


# ============================================================================ MMATH
class MMathTask(Task):
    """MMATH's competition problems (MATH-500, AIME 2024/25, CNMO): evaluation only, no train split."""

    name = "mmath"
    splits = ("test",)

    def __init__(self, *, lang: str = "en", sources: str | tuple[str, ...] | None = None,
                 format_weight: float = 0.0, quiet: bool = False) -> None:
        super().__init__(format_weight=format_weight)
        if lang not in LANGUAGES:
            raise TaskError(f"unknown MMATH language {lang!r}; known: {', '.join(LANGUAGES)}")
        if isinstance(sources, str):
            sources = tuple(s.strip() for s in sources.split(",") if s.strip())
        unknown = [s for s in sources or () if s not in SOURCES]
        if unknown or sources == ():
            raise TaskError(f"unknown MMATH source {', '.join(unknown) or '(none given)'}; "
                            f"known: {', '.join(SOURCES)}")
        self.lang, self.sources, self.quiet = lang, sources, quiet
        self._all: list[Problem] | None = None

    def all_problems(self) -> list[Problem]:
        """Every problem of the chosen language and sources, in the file's order."""
        if self._all is None:
            self._all = [Problem(id=f"mmath/{p.id}", question=p.question, answer=p.answer,
                                 prompt=chat_prompt(p.question),
                                 metadata={"task": self.name, "split": "test", "source": p.source,
                                           "lang": p.lang})
                         for p in load_mmath(self.lang, self.sources, quiet=self.quiet)]
        return self._all

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        if split == "train":
            raise TaskError("mmath is evaluation-only: its problems are benchmark test problems (MATH-500, "
                            "AIME, CNMO) and have no train split; train on a reasoning-gym task")
        self._check(split, n)
        everything = self.all_problems()
        if n > len(everything):
            chosen = ", ".join(self.sources or SOURCES)
            raise TaskError(f"mmath ({self.lang}, {chosen}) has {len(everything)} problems, not {n}")
        return random.Random(seed).sample(everything, n)

    def grade(self, problem: Problem, completion: str) -> Grade:
        answer = extract_answer(completion)
        correct = answers_match(answer, problem.answer)
        return Grade(answer=answer, score=float(correct), correct=correct,
                     formatted=has_boxed_answer(completion))


# ============================================================================ the registry
def _reasoning_gym(name: str) -> Callable[..., Task]:
    return lambda **options: ReasoningGymTask(name, **options)


TASKS: dict[str, Callable[..., Task]] = {name: _reasoning_gym(name) for name in REASONING_GYM_TASKS}
TASKS["mmath"] = MMathTask


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`, built with `options` (a reasoning-gym config field, `format_weight`, ...)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**options)
