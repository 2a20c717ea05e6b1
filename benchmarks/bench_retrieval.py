"""Retrieval quality and ANN speed: BM25 vs dense (all-MiniLM-L6-v2) vs hybrid on HotpotQA and doc2dial.

For each task the corpus index is built once through `lmforge.rag` (`build_task_index`,
the same as `lmforge rag eval --task NAME`; flat FAISS, the exact reference) and cached
under the lmforge cache, `--step` documents per update so an interrupted build keeps
what it embedded. Then every mode is scored with the same metrics (`lmforge.rag.metrics`),
beside the shipped Dragon-multiturn top-5 run on doc2dial (computed from its file).

HotpotQA's corpus is built sample-first: the paragraphs of `--questions` seeded questions
come first, so that when embedding all 66,581 paragraphs is too slow for the machine,
`--corpus sample` scores those questions against the pool of their own paragraphs (ten
a question: the two gold and eight distractors HotpotQA chose to resemble them) while
the rest is still being embedded, and `--corpus full` against all of them once it is.

The ANN part builds HNSW (M 32, efConstruction 200) from the same stored vectors as the
flat index and asks both for the top 10 of the same queries, in the same process:
recall@10 of HNSW against flat's exact top 10, and queries per second one query at a
time (a chat's retrieval) and in one batch, with the HNSW search width efSearch swept.

    python benchmarks/bench_retrieval.py --stage build --task doc2dial hotpotqa   # embeds (slow)
    python benchmarks/bench_retrieval.py --task doc2dial hotpotqa --corpus sample --json rag.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import announce  # noqa: E402

from lmforge.rag.chunk import ChunkConfig  # noqa: E402
from lmforge.rag.index import RagIndex, build_dense, read_manifest  # noqa: E402
from lmforge.rag.retrieve import Retriever  # noqa: E402
from lmforge.rag.tasks import (  # noqa: E402
    TASK_CHUNKING,
    Query,
    RetrievalTask,
    build_task_index,
    load_task,
    run_task,
    task_index_dir,
)

#: the reference for HNSW is FAISS's own exact flat index; for the modes, the shipped Dragon run
ANCHORS: tuple[str, ...] = ()
MODES = ("bm25", "dense", "hybrid")


def sample_first(task: RetrievalTask, questions: int, seed: int) -> tuple[RetrievalTask, set[str]]:
    """The task with the sampled questions' paragraphs first in its corpus, and those paragraphs' keys."""
    if questions >= len(task.queries):
        return task, {d.key for d in task.documents}
    chosen = set(random.Random(seed).sample(range(len(task.queries)), questions))
    import json as _json

    from lmforge.eval.qa import qa_path

    items = _json.loads(qa_path("hotpotqa", quiet=True).read_text(encoding="utf-8"))
    by_title: dict[str, list[str]] = {}
    for doc in task.documents:
        by_title.setdefault(doc.title or "", []).append(doc.key)
    pool: dict[str, None] = {}
    for i in sorted(chosen):
        for title, _ in items[i]["context"]:
            for key in by_title[title]:
                pool[key] = None
    first = [d for d in task.documents if d.key in pool]
    rest = [d for d in task.documents if d.key not in pool]
    return RetrievalTask(task.name, first + rest, task.queries, task.baseline, task.baseline_name), set(pool)


def hotpot_queries(task: RetrievalTask, questions: int, seed: int, pool: set[str] | None) -> list[Query]:
    from lmforge.eval.tasks import sample_items

    chosen = sample_items(task.queries, questions if questions < len(task.queries) else None, seed)
    if pool is None:
        return chosen
    within = tuple(sorted(pool))
    return [Query(q.id, q.text, q.relevant, within) for q in chosen]


def ann(index: RagIndex, queries: np.ndarray, ef_values: list[int]) -> dict[str, Any]:
    """HNSW against exact flat search over the same vectors: recall@10 and queries/s."""
    import faiss

    settings = {"M": 32, "ef_construction": 200, "ef_search": 128}
    started = time.perf_counter()
    hnsw = build_dense("hnsw", index.vectors, index.ids, settings)
    build_seconds = time.perf_counter() - started
    flat = build_dense("flat", index.vectors, index.ids, {})

    threads = faiss.omp_get_max_threads()

    def timed(search, batch: bool) -> tuple[np.ndarray, float]:
        """Best of three (the machine is shared); one query at a time on one thread, as a chat
        retrieves (OpenMP over a single query only adds synchronisation), a batch on all."""
        faiss.omp_set_num_threads(threads if batch else 1)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            if batch:
                _, found = search(queries)
            else:
                found = np.concatenate([search(queries[i:i + 1])[1] for i in range(len(queries))])
            best = min(best, time.perf_counter() - started)
        faiss.omp_set_num_threads(threads)
        return found, len(queries) / best

    exact, flat_qps_one = timed(lambda q: flat.search(q, 10), batch=False)
    _, flat_qps_batch = timed(lambda q: flat.search(q, 10), batch=True)
    rows = []
    for ef in ef_values:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        found, qps_one = timed(lambda q, p=params: hnsw.search(q, 10, params=p), batch=False)
        _, qps_batch = timed(lambda q, p=params: hnsw.search(q, 10, params=p), batch=True)
        recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)]))
        rows.append({"ef_search": ef, "recall@10_vs_flat": recall, "qps_one": qps_one, "qps_batch": qps_batch,
                     "speedup_one": qps_one / flat_qps_one, "speedup_batch": qps_batch / flat_qps_batch})
    return {"vectors": int(index.vectors.shape[0]), "dim": int(index.vectors.shape[1]),
            "queries": len(queries), "threads": threads,
            "hnsw_build_seconds": build_seconds, "flat_qps_one": flat_qps_one,
            "flat_qps_batch": flat_qps_batch, "hnsw": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=["doc2dial", "hotpotqa"],
                        choices=["doc2dial", "hotpotqa"])
    parser.add_argument("--stage", choices=["build", "eval", "all"], default="all")
    parser.add_argument("--corpus", choices=["sample", "full"], default="full",
                        help="hotpotqa: score against the sampled questions' paragraphs, or all 66,581")
    parser.add_argument("--questions", type=int, default=1000, help="hotpotqa: seeded sample of questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=4000, help="documents embedded per index update")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--ef", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="cut each passage into token windows of this many (overlap 40), a passage "
                             "ranked by its best window; default: one chunk a passage")
    parser.add_argument("--ann", action="store_true",
                        help="hotpotqa --corpus sample: HNSW vs flat over every vector embedded so far too")
    parser.add_argument("--ann-only", action="store_true", help="skip the modes: only HNSW vs flat")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    machine = announce()

    from lmforge.rag.embed import load_embedder

    embedder = load_embedder("minilm")
    results: dict[str, Any] = {"machine": machine, "embedder": embedder.name, "tasks": {}}
    for name in args.task:
        task = load_task(name)
        pool = None
        if name == "hotpotqa":
            task, pool = sample_first(task, args.questions, args.seed)
        chunking = ChunkConfig("tokens", args.chunk_tokens, 40) if args.chunk_tokens else TASK_CHUNKING
        path = task_index_dir(name, embedder.name, chunking)
        if args.stage in ("build", "all"):
            report = build_task_index(task, embedder, path, kind="flat", chunking=chunking, step=args.step,
                                      progress=True)
            print(f"{name}: {report.chunks} chunks indexed ({report.seconds:.0f} s, last update)", flush=True)
        if args.stage == "build":
            continue
        held = set(read_manifest(path)["documents"])
        if name == "hotpotqa":
            if args.corpus == "full" and len(held) < len(task.documents):
                raise SystemExit(f"hotpotqa: {len(held)} of {len(task.documents)} paragraphs embedded; "
                                 f"run --stage build to finish, or use --corpus sample")
            within = pool if args.corpus == "sample" else None
            queries = hotpot_queries(task, args.questions, args.seed, within)
            task = RetrievalTask(name, task.documents, queries)
        index = RagIndex.open(path, load_vectors=name == "hotpotqa")
        entry_corpus = len(pool) if (pool and args.corpus == "sample") else len(held)
        retriever = Retriever(index, embedder)
        entry: dict[str, Any] = {"corpus": entry_corpus, "chunks": len(index.chunks),
                                 "chunking": chunking.__dict__, "queries": len(task.queries), "modes": {}}
        for mode in [] if args.ann_only else args.modes:
            depth = 200 if args.chunk_tokens else 100  # several chunks a passage: look deeper
            result = run_task(task, retriever, mode=mode, depth=depth, progress=True)
            entry["modes"][mode] = {"metrics": result["metrics"], "seconds": result["seconds"]}
            print(f"{name} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items())
                  + f" ({result['seconds']:.0f} s)", flush=True)
            if "baseline" in result:
                entry["baseline"] = result["baseline"]
        if "baseline" in entry:
            print(f"{name} {entry['baseline']['name']}: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in entry["baseline"]["metrics"].items()), flush=True)
        if name == "hotpotqa" and (args.corpus == "full" or args.ann):
            vectors = embedder.encode([q.text for q in task.queries])
            entry["ann"] = ann(index, vectors, args.ef)
            a = entry["ann"]
            print(f"ANN over {a['vectors']:,} vectors, {a['queries']} queries (batched on {a['threads']} "
                  f"threads): flat "
                  f"{a['flat_qps_one']:.0f} q/s one at a time, {a['flat_qps_batch']:.0f} batched; "
                  f"HNSW built in {a['hnsw_build_seconds']:.0f} s", flush=True)
            for row in a["hnsw"]:
                print(f"  efSearch {row['ef_search']}: recall@10 vs flat {row['recall@10_vs_flat']:.3f}, "
                      f"{row['qps_one']:.0f} q/s one at a time ({row['speedup_one']:.1f}x flat), "
                      f"{row['qps_batch']:.0f} batched ({row['speedup_batch']:.1f}x)", flush=True)
        results["tasks"][name] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
