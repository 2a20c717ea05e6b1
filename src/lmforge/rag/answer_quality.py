"""Does retrieval help the answers? HotpotQA exact match and F1 with and without it.

Three settings on the same sample of HotpotQA dev questions, the same model and greedy
decoding, scored by HotpotQA's official normalisation (lmforge.eval.qa):

- **closed book**: the question alone; what the model knows from pretraining;
- **retrieved**: `lmforge rag ask`'s prompt over the passages the index returns for the
  question (from the ~66K pooled paragraphs when the index is the task's own), relevance
  guard included, so an "I don't know." scores 0;
- **gold paragraphs**: the two paragraphs the question was written from, in `lmforge eval
  --task hotpotqa`'s prompt layout: the ceiling a perfect retriever would give this model.

All three end with the same instruction: "Answer with a short phrase." by default (`hint`);
`lmforge eval`'s own, "Answer with yes, no, or a short phrase from the context.", makes
SmolLM2-135M answer "No" to most questions, yes/no or not.

The reply's citation markers are removed before scoring ("Paris [1]" is "Paris"), and
the answer is its first line without "Answer:" (as `lmforge eval` reads a reply).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lmforge.eval.qa import QAItem, prediction_from_reply, qa_path, read_hotpotqa, score_item
from lmforge.eval.tasks import sample_items
from lmforge.rag.answer import AnswerConfig, answer_many, without_citations
from lmforge.rag.retrieve import Retriever

__all__ = ["HINTS", "SETTINGS", "closed_book_messages", "gold_messages", "hotpotqa_answer_quality"]

SETTINGS = ("closed_book", "retrieved", "gold_paragraphs")
HINTS = {"short": "Answer with a short phrase.", "yesno": "Answer with yes, no, or a short phrase."}


def gold_titles(item: QAItem) -> set[str]:
    """The titles of a question's gold paragraphs (its context holds only those: "Title: text")."""
    return {paragraph.split(":", 1)[0] for paragraph in item.context.split("\n\n")}


def closed_book_messages(question: str, hint: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question: {question}\n{hint}"}]


def gold_messages(item: QAItem, hint: str) -> list[dict[str, str]]:
    """`lmforge eval --task hotpotqa`'s prompt (context, question, instruction) with `hint`."""
    text = f"Context: {item.context.strip()}\n\nQuestion: {item.question.strip()}\n{hint}"
    return [{"role": "user", "content": text}]


def hotpotqa_answer_quality(retriever: Retriever, engine: Any, *, limit: int = 200, seed: int = 0,
                            config: AnswerConfig | None = None, only_indexed: bool = False,
                            hint: str = "short",
                            say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """{setting: {"exact_match", "f1", "seconds"}} over `limit` questions drawn with `seed`, plus
    "questions", "abstained" (retrieved setting) and per-question "records". `only_indexed`: draw
    only questions whose gold paragraphs the index holds (an index of part of the corpus)."""
    from lmforge.infer.sampling import SamplingParams

    config = config or AnswerConfig(max_tokens=32)
    if hint not in HINTS:
        raise ValueError(f"hint must be one of {', '.join(HINTS)}, got {hint!r}")
    instruction = HINTS[hint]
    items = read_hotpotqa(qa_path("hotpotqa", quiet=True))
    if only_indexed:
        held = {chunk.doc_id for chunk in retriever.index.chunks}
        items = [item for item in items if gold_titles(item) <= held]
    items = sample_items(items, limit, seed)
    params = SamplingParams(temperature=0.0, max_tokens=config.max_tokens)
    tokenizer = engine.tokenizer
    replies: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    closed = [tokenizer.encode_chat_prompt(closed_book_messages(item.question, instruction))
              for item in items]
    replies["closed_book"] = [c.text for c in engine.complete(closed, params)]
    seconds["closed_book"] = time.perf_counter() - started
    say(f"closed book: {len(items)} questions in {seconds['closed_book']:.0f}s")

    started = time.perf_counter()
    questions = [item.question for item in items]
    answers = answer_many(questions, retriever, engine, config, instruction=instruction)
    replies["retrieved"] = [a.text for a in answers]
    seconds["retrieved"] = time.perf_counter() - started
    say(f"retrieved ({config.mode}, k={config.k}): {len(items)} questions in {seconds['retrieved']:.0f}s")

    started = time.perf_counter()
    gold = [tokenizer.encode_chat_prompt(gold_messages(item, instruction)) for item in items]
    replies["gold_paragraphs"] = [c.text for c in engine.complete(gold, params)]
    seconds["gold_paragraphs"] = time.perf_counter() - started
    say(f"gold paragraphs: {len(items)} questions in {seconds['gold_paragraphs']:.0f}s")

    result: dict[str, Any] = {"questions": len(items), "seed": seed, "mode": config.mode, "k": config.k,
                              "corpus": len(retriever.index.chunks), "only_indexed": only_indexed,
                              "hint": hint,
                              "abstained": sum(a.abstained for a in answers), "records": []}
    scores = {setting: [score_item(item.answers, prediction_from_reply(without_citations(reply)), hotpot=True)
                        for item, reply in zip(items, replies[setting])] for setting in SETTINGS}
    for setting in SETTINGS:
        ems, f1s = zip(*scores[setting])
        result[setting] = {"exact_match": sum(ems) / len(ems), "f1": sum(f1s) / len(f1s),
                           "seconds": round(seconds[setting], 1)}
    for i, item in enumerate(items):
        result["records"].append({"id": item.id, "question": item.question, "answers": list(item.answers),
                                  **{s: {"reply": replies[s][i], "f1": scores[s][i][1]} for s in SETTINGS},
                                  "sources": [h.chunk.doc_id for h in answers[i].sources]})
    return result
