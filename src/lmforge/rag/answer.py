"""Answering from retrieved passages: numbered sources in the prompt, citations in the reply.

The model sees the question after the passages, each under a number:

    [1] (handbook/apt.rst > Installing packages)
    apt-get install installs a package and what it depends on ...

    [2] ...

    Question: how do I install a package?

and is told to answer from them alone, cite them as [1], [2], and say "I don't know"
when they do not hold the answer. Two guards keep it honest:

- **Relevance**, before the model is asked: a passage whose cosine similarity to the
  question (the index's own embedder) is below `min_relevance` is dropped; with none left
  the answer is "I don't know" without generating anything, since a small model given
  unrelated text answers from it anyway. Without an embedder (a BM25-only index) a passage
  needs at least one of the question's words (a BM25 score above 0).
- **Room**: passages go in best first until the prompt would crowd out the reply
  (`max_tokens`); the last one that fits partly is cut at a token boundary, so the model
  never receives a silently truncated prompt.

Citations are read back from the reply (`[2]`, `[1, 3]`, `[1][2]`); numbers that name no
source are ignored rather than trusted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.rag.retrieve import Hit, Retriever

__all__ = ["DONT_KNOW", "Answer", "AnswerConfig", "answer", "answer_many", "build_messages", "cited_numbers",
           "relevant_hits", "relevant_hits_many", "without_citations"]

DONT_KNOW = "I don't know."
SYSTEM = ("Answer the question using only the numbered sources. Cite each source you use by its number in "
          "square brackets, like [1]. If the sources do not contain the answer, reply exactly: "
          f"{DONT_KNOW}")
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass
class AnswerConfig:
    k: int = 4  # passages retrieved
    mode: str = "hybrid"  # dense, bm25 or hybrid (see lmforge.rag.retrieve)
    min_relevance: float = 0.25  # cosine(question, passage) below this: not shown to the model
    max_tokens: int = 256  # the reply's budget; the passages get what is left of the context
    temperature: float = 0.0  # greedy: the same question gets the same answer

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if not -1.0 <= self.min_relevance <= 1.0:
            raise ValueError(f"min_relevance is a cosine similarity in [-1, 1], got {self.min_relevance}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]  # the passages the model saw, numbered 1..n in this order
    relevance: list[float]  # cosine(question, source) of each (BM25 score without an embedder)
    cited: list[int] = field(default_factory=list)  # source numbers the reply cites
    abstained: bool = False  # nothing relevant was retrieved: the model was not asked
    prompt_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.text,
                "sources": [{"number": n, "source": hit.chunk.source, "text": hit.chunk.text,
                             "headings": list(hit.chunk.headings), "score": hit.score, "relevance": rel,
                             "cited": n in self.cited}
                            for n, (hit, rel) in enumerate(zip(self.sources, self.relevance), start=1)],
                "cited": self.cited, "abstained": self.abstained, "prompt_tokens": self.prompt_tokens}


def relevant_hits(question: str, hits: Sequence[Hit], retriever: Retriever,
                  min_relevance: float) -> tuple[list[Hit], list[float]]:
    """The hits that pass the relevance guard, with their relevance, in retrieval order."""
    return relevant_hits_many([question], [hits], retriever, min_relevance)[0]


def relevant_hits_many(questions: Sequence[str], hits: Sequence[Sequence[Hit]], retriever: Retriever,
                       min_relevance: float) -> list[tuple[list[Hit], list[float]]]:
    """`relevant_hits` for a batch: passages whose cosine to the question reaches `min_relevance`
    (with no embedder, a BM25-only index: those sharing a word with it)."""
    if retriever.embedder is None:
        bm25 = retriever.index.bm25 is not None
        kept = [[(h, h.score) for h in found if bm25 and h.score > 0] for found in hits]
    else:
        kept = [[(h, s) for h, s in zip(found, row) if s >= min_relevance]
                for found, row in zip(hits, retriever.relevance(questions, hits))]
    return [([h for h, _ in pairs], [s for _, s in pairs]) for pairs in kept]


def _source_block(number: int, hit: Hit, text: str) -> str:
    where = " > ".join((hit.chunk.source, *hit.chunk.headings))
    return f"[{number}] ({where})\n{text}"


def build_messages(question: str, hits: Sequence[Hit], tokenizer: Any, *, context: int, max_tokens: int,
                   history: Sequence[dict[str, str]] = ()) -> tuple[list[dict[str, str]], int]:
    """The chat messages (system, earlier turns, user with sources) and how many sources fit.

    Sources are added best first while the prompt leaves `max_tokens` of the `context`;
    the first that does not fit whole is cut to the room left (if any), the rest are dropped.
    """
    def render(blocks: list[str]) -> list[dict[str, str]]:
        sources = "\n\n".join(blocks) if blocks else "(no sources)"
        return [{"role": "system", "content": SYSTEM}, *history,
                {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]

    def fits(blocks: list[str]) -> bool:
        return len(tokenizer.encode_chat_prompt(render(blocks))) <= room

    room = context - max_tokens
    if not fits([]):
        raise ValueError(f"the question leaves no room in the model's {context}-token context for a "
                         f"{max_tokens}-token reply; shorten it or lower max_tokens")
    blocks: list[str] = []
    for number, hit in enumerate(hits, start=1):
        block = _source_block(number, hit, hit.chunk.text)
        if fits([*blocks, block]):
            blocks.append(block)
            continue
        cut = _cut_to_fit(hit.chunk.text, tokenizer,
                          lambda text, n=number, h=hit: fits([*blocks, _source_block(n, h, text)]))
        if cut:
            blocks.append(_source_block(number, hit, cut))
        break
    return render(blocks), len(blocks)


def _cut_to_fit(text: str, tokenizer: Any, fits: Any, *, shortest: int = 16) -> str | None:
    """The longest token prefix of `text` (with an ellipsis) that `fits`, by bisection; None under
    `shortest` tokens (a stub that short says nothing)."""
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    low, high = 0, len(ids)  # a prefix of `low` tokens fits; `high + 1` does not
    while low < high:
        middle = (low + high + 1) // 2
        if fits(tokenizer.decode(ids[:middle]) + "…"):
            low = middle
        else:
            high = middle - 1
    return tokenizer.decode(ids[:low]) + "…" if low >= shortest else None


def without_citations(text: str) -> str:
    """The reply with its [n] markers taken out (to score the answer itself)."""
    return re.sub(r"\s*" + _CITATION.pattern, "", text).strip()


def cited_numbers(text: str, n_sources: int) -> list[int]:
    """Source numbers cited in `text` ([2], [1, 3], [1][2]), each once, in order of first citation."""
    seen: list[int] = []
    for group in _CITATION.findall(text):
        for number in (int(x) for x in group.split(",")):
            if 1 <= number <= n_sources and number not in seen:
                seen.append(number)
    return seen


def answer_many(questions: Sequence[str], retriever: Retriever, engine: Any,
                config: AnswerConfig | None = None, *, instruction: str = "",
                history: Sequence[dict[str, str]] = ()) -> list[Answer]:
    """`answer` for many questions: one batched retrieval, then every prompt through the engine at
    once (continuous batching). `instruction` follows each question in the prompt only (say, "answer
    with a short phrase"), so it does not sway retrieval."""
    from lmforge.infer.sampling import SamplingParams

    config = config or AnswerConfig()
    questions = [q.strip() for q in questions]
    if not all(questions):
        raise ValueError("a question is empty")
    tokenizer = engine.tokenizer
    max_tokens = min(config.max_tokens, engine.context - 1)
    answers: list[Answer] = []
    prompts: list[list[int]] = []
    found = retriever.search_many(questions, config.k, config.mode)
    guarded = relevant_hits_many(questions, found, retriever, config.min_relevance)
    for question, (kept, relevance) in zip(questions, guarded):
        if not kept:
            answers.append(Answer(question, DONT_KNOW, [], [], abstained=True))
            continue
        asked = f"{question}\n{instruction}" if instruction else question
        messages, fitted = build_messages(asked, kept, tokenizer, context=engine.context,
                                          max_tokens=max_tokens, history=history)
        prompt = tokenizer.encode_chat_prompt(messages)
        prompts.append(prompt)
        answers.append(Answer(question, "", kept[:fitted], relevance[:fitted], prompt_tokens=len(prompt)))
    params = SamplingParams(temperature=config.temperature, max_tokens=max_tokens)
    replies = iter(engine.complete(prompts, params)) if prompts else iter(())
    for item in answers:
        if not item.abstained:
            item.text = next(replies).text.strip()
            item.cited = cited_numbers(item.text, len(item.sources))
    return answers


def answer(question: str, retriever: Retriever, engine: Any, config: AnswerConfig | None = None, *,
           history: Sequence[dict[str, str]] = ()) -> Answer:
    """Retrieve, guard, prompt, generate (with `engine`, an `lmforge.infer.Engine`) and read citations."""
    if not question.strip():
        raise ValueError("the question is empty")
    return answer_many([question], retriever, engine, config, history=history)[0]
