"""`lmforge rag`: index documents, search them, and score retrieval on real benchmarks.

    lmforge rag index DOCS... -o INDEX [--embedder minilm|none|FOLDER] [--kind auto|flat|hnsw|ivf]
                      [--chunking structure|tokens] [--chunk-tokens N] [--overlap M] [--json]
    lmforge rag search --index INDEX "query" [-k 5] [--mode dense|bm25|hybrid] [--json]
    lmforge rag ask --index INDEX --model M "question" [-k 4] [--mode ...] [--json]
    lmforge rag eval --task hotpotqa|doc2dial [--index INDEX] [--mode ...] [--limit N] [--json]
                     [--model M --answers N]   (hotpotqa: answer EM/F1 with and without retrieval)

`index` makes INDEX mirror DOCS: new and changed documents are chunked and embedded,
those no longer among DOCS are removed, the rest is kept as it was. `eval` without
--index builds (once) the task's corpus index in the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmforge.cli_parser import add_threads_flag, apply_threads

MODE_HELP = "dense, bm25 or hybrid (default: hybrid; bm25 for an index built with --embedder none)"
EMBEDDER_HELP = ("the sentence encoder: minilm (the packaged all-MiniLM-L6-v2), a sentence-transformers "
                 "folder, or none for a BM25-only index")


def _embedder(spec: str | None):
    if spec is None or spec.lower() == "none":
        return None
    from lmforge.rag.embed import load_embedder

    return load_embedder(spec)


def _default_mode(index: Any) -> str:
    return "hybrid" if index.embedder_name is not None else "bm25"


def _index_embedder(index: Any, spec: str | None):
    """The embedder an index was built with (or the one named, which must be the same)."""
    if index.embedder_name is None:
        if spec not in (None, "none"):
            raise ValueError(f"{index.path} is a BM25-only index (built with --embedder none)")
        return None
    embedder = _embedder(spec or index.embedder_name)
    index.check_embedder(embedder.name)
    return embedder


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ============================================================================ rag index
def cmd_index(args: argparse.Namespace) -> int:
    from lmforge.data.document import StageStats
    from lmforge.rag.chunk import ChunkConfig
    from lmforge.rag.index import update_index
    from lmforge.rag.sources import read_sources

    apply_threads(args.threads)
    chunking = ChunkConfig(args.chunking, args.chunk_tokens, args.overlap)
    stats = StageStats("read")
    documents = list(read_sources(args.docs, stats, exclude=args.output))  # bad paths fail before loading
    embedder = _embedder(args.embedder)
    if embedder is not None and chunking.max_tokens > embedder.max_tokens - 2:
        raise ValueError(f"--chunk-tokens {chunking.max_tokens} is more than {embedder.name} reads "
                         f"({embedder.max_tokens - 2} tokens besides [CLS] and [SEP]): the ends of chunks "
                         f"would be cut off unseen")
    report = update_index(args.output, documents, embedder, kind=args.kind, chunking=chunking,
                          progress=not args.quiet, skipped=dict(stats.dropped))
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    d = report
    kind = "BM25 only" if d.kind == "none" else f"{d.kind} + BM25"
    print(f"{d.path}: {d.documents_added} documents added, {d.documents_changed} changed, "
          f"{d.documents_removed} removed, {d.documents_kept} kept; {d.chunks_added} chunks "
          f"{'added' if d.kind == 'none' else 'embedded'}, {d.chunks_removed} removed, {d.chunks} in all "
          f"({kind}, {_size(d.bytes)}, {d.seconds:.1f} s)" + ("" if d.written else "; nothing changed"))
    for reason in d.rebuilt:
        print(f"rebuilt {reason}")
    if d.skipped:
        print("skipped inputs: " + ", ".join(f"{n} {why}" for why, n in sorted(d.skipped.items())))
    return 0


# ============================================================================ rag search
def cmd_search(args: argparse.Namespace) -> int:
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import Retriever

    apply_threads(args.threads)
    index = RagIndex.open(args.index)
    args.mode = args.mode or _default_mode(index)
    embedder = _index_embedder(index, args.embedder) if args.mode != "bm25" else None
    hits = Retriever(index, embedder).search(args.query, args.k, args.mode)
    if args.json:
        print(json.dumps([{"rank": h.rank, "score": h.score, "source": h.chunk.source,
                           "chunk": h.chunk.number, "start": h.chunk.start, "end": h.chunk.end,
                           "headings": list(h.chunk.headings),
                           "text": h.chunk.text} for h in hits]))
        return 0
    if not hits:
        print("no match")
    for h in hits:
        where = " > ".join(h.chunk.headings)
        print(f"[{h.rank}] {h.score:.4f}  {h.chunk.source} #{h.chunk.number}"
              + (f"  ({where})" if where else ""))
        text = " ".join(h.chunk.text.split())
        print(f"    {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


# ============================================================================ rag ask
def cmd_ask(args: argparse.Namespace) -> int:
    from lmforge.infer.engine import Engine
    from lmforge.rag.answer import DONT_KNOW, Answer, AnswerConfig, answer, relevant_hits
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import Retriever

    apply_threads(args.threads)
    index = RagIndex.open(args.index)
    mode = args.mode or _default_mode(index)
    retriever = Retriever(index, _index_embedder(index, None))
    config = AnswerConfig(k=args.k, mode=mode, min_relevance=args.min_relevance, max_tokens=args.max_tokens)
    question = args.question.strip()
    if question and not relevant_hits(question, retriever.search(question, config.k, mode), retriever,
                                      config.min_relevance)[0]:  # nothing to answer from: no model needed
        result = Answer(question, DONT_KNOW, [], [], abstained=True)
    else:
        engine = Engine.from_pretrained(args.model, quantize=args.quantize)
        result = answer(question, retriever, engine, config)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.text)
    if result.abstained:
        print(f"\n(no passage of {index.path} was relevant enough: similarity below {config.min_relevance})")
    for number, (hit, relevance) in enumerate(zip(result.sources, result.relevance), start=1):
        where = " > ".join((hit.chunk.source, *hit.chunk.headings))
        mark = "cited" if number in result.cited else "not cited"
        print(f"\n[{number}] {where}  (relevance {relevance:.2f}, {mark})")
        text = " ".join(hit.chunk.text.split())
        print(f"    {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


# ============================================================================ rag eval
def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import Retriever
    from lmforge.rag.tasks import build_task_index, check_corpus, load_task, run_task, task_index_dir

    apply_threads(args.threads)
    task = load_task(args.task, quiet=args.quiet)
    if args.index is None:
        embedder = _embedder(args.embedder or "minilm")
        path = task_index_dir(task.name, embedder.name if embedder is not None else None)
        if not args.quiet:
            print(f"lmforge: the {task.name} corpus index ({len(task.documents):,} passages) is kept in "
                  f"{path}", file=sys.stderr)
        step = 4000 if embedder is not None else None  # an interrupted build keeps what it embedded
        build_task_index(task, embedder, path, kind=args.kind, step=step, progress=not args.quiet)
        index = RagIndex.open(path)
        args.mode = args.mode or _default_mode(index)
    else:
        index = RagIndex.open(args.index)
        args.mode = args.mode or _default_mode(index)
        embedder = _index_embedder(index, args.embedder) if args.mode != "bm25" else None
    check_corpus(task, {c.doc_id for c in index.chunks}, str(index.path))
    if args.mode != "bm25" and embedder is None:
        raise ValueError(f"--mode {args.mode} needs dense vectors; this index is BM25-only (use --mode bm25)")
    result = run_task(task, Retriever(index, embedder), mode=args.mode, limit=args.limit, seed=args.seed,
                      progress=not args.quiet)
    result["index"] = str(index.path)
    if args.model is not None:
        result["answers"] = _answer_quality(args, task.name, Retriever(index, embedder))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{task.name} ({result['queries']:,} queries, {result['corpus']:,} passages, {args.mode}, "
          f"{result['seconds']:.1f} s): " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    if "baseline" in result:
        base = result["baseline"]
        print(f"{base['name']}: " + ", ".join(f"{k} {v:.4f}" for k, v in base["metrics"].items()))
    if "answers" in result:
        from lmforge.rag.answer_quality import SETTINGS

        quality = result["answers"]
        print(f"answers of {args.model} to {quality['questions']} questions (EM / F1; "
              f"{quality['abstained']} \"I don't know\" from the relevance guard):")
        for setting in SETTINGS:
            print(f"  {setting.replace('_', ' '):16} {quality[setting]['exact_match']:.3f} / "
                  f"{quality[setting]['f1']:.3f}  ({quality[setting]['seconds']:.0f} s)")
    return 0


def _answer_quality(args: argparse.Namespace, task: str, retriever: Any) -> dict[str, Any]:
    """`--model`: HotpotQA EM/F1 closed book, with this retrieval, and with the gold paragraphs."""
    from lmforge.infer.engine import Engine
    from lmforge.rag.answer import AnswerConfig
    from lmforge.rag.answer_quality import hotpotqa_answer_quality

    if task != "hotpotqa":
        raise ValueError(f"--model scores answers on hotpotqa (its questions have gold answers); {task} "
                         "is scored on retrieval alone")
    engine = Engine.from_pretrained(args.model)
    say = (lambda text: None) if args.quiet else (lambda text: print(f"lmforge: {text}", file=sys.stderr))
    quality = hotpotqa_answer_quality(retriever, engine, limit=args.answers, seed=args.seed,
                                      config=AnswerConfig(mode=args.mode, max_tokens=32), say=say)
    quality.pop("records")
    return quality


# ============================================================================ the parser
def register(sub: argparse._SubParsersAction) -> None:
    """Add `rag` and its verbs to the `lmforge` subcommands."""
    from lmforge.rag.chunk import MODES as CHUNKINGS
    from lmforge.rag.index import KINDS
    from lmforge.rag.retrieve import MODES
    from lmforge.rag.tasks import TASKS

    p = sub.add_parser("rag", help="retrieval-augmented generation: index documents, search, evaluate",
                       description="Chunk, embed and index documents (FAISS + BM25), search them, and score "
                                   "retrieval on HotpotQA and doc2dial.")
    verbs = p.add_subparsers(dest="rag_command", required=True, metavar="RAG_COMMAND")

    i = verbs.add_parser("index", help="index documents (HTML, WARC, text, Markdown, reST, JSONL, Parquet)",
                         description="Make INDEX hold DOCS: new and changed documents are chunked and "
                                     "embedded, removed ones deleted, unchanged ones kept.")
    i.add_argument("docs", nargs="+", metavar="DOCS", help="files and folders, as for `lmforge prepare`")
    i.add_argument("--output", "-o", required=True, metavar="INDEX",
                   help="the index folder (created or updated)")
    i.add_argument("--embedder", default="minilm", help=EMBEDDER_HELP)
    i.add_argument("--kind", choices=KINDS, default="auto",
                   help="FAISS index: flat (exact), hnsw, ivf; auto: flat below 50,000 chunks, hnsw below "
                        "2,000,000, ivf above (default: auto)")
    i.add_argument("--chunking", choices=CHUNKINGS, default="structure",
                   help="structure: at headings and paragraphs; tokens: plain token windows; none: one "
                        "chunk a document (default: structure)")
    i.add_argument("--chunk-tokens", type=int, default=200, help="most tokens in a chunk (the embedder's)")
    i.add_argument("--overlap", type=int, default=40, help="tokens a cut-up passage's next chunk repeats")
    i.add_argument("--json", action="store_true", help="print what changed as JSON")
    i.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    add_threads_flag(i)
    i.set_defaults(func=cmd_index)

    s = verbs.add_parser("search", help="the best chunks for a query",
                         description="Search an index: dense (the embedder), bm25, or hybrid (reciprocal "
                                     "rank fusion of the two).")
    s.add_argument("query")
    s.add_argument("--index", required=True, help="a folder written by `lmforge rag index`")
    s.add_argument("-k", type=int, default=5, help="how many chunks")
    s.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    s.add_argument("--embedder", default=None, help="(default: the one the index was built with)")
    s.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_threads_flag(s)
    s.set_defaults(func=cmd_search)

    a = verbs.add_parser("ask", help="answer a question from an index, citing its passages",
                         description="Retrieve passages for the question, put them in the model's prompt as "
                                     "numbered sources, and answer citing them; \"I don't know.\" when no "
                                     "passage is relevant (the model is then not asked).")
    a.add_argument("question")
    a.add_argument("--index", required=True, help="a folder written by `lmforge rag index`")
    a.add_argument("--model", required=True,
                   help="checkpoint or run folder, .gguf file or sample name (smollm2)")
    a.add_argument("-k", type=int, default=4, help="passages retrieved (default: 4)")
    a.add_argument("--mode", choices=MODES, default=None,
                   help="dense, bm25 or hybrid (default: hybrid; bm25 for a BM25-only index)")
    a.add_argument("--min-relevance", type=float, default=0.25,
                   help="cosine similarity of question and passage below which a passage is not shown to "
                        "the model (default: 0.25)")
    a.add_argument("--max-tokens", type=int, default=256, help="the reply's most tokens")
    a.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    a.add_argument("--json", action="store_true",
                   help='print {"answer": ..., "sources": [{"source", "text", "score", ...}]}')
    add_threads_flag(a)
    a.set_defaults(func=cmd_ask)

    e = verbs.add_parser("eval", help="recall@k, MRR and nDCG@10 on HotpotQA or doc2dial",
                         description="Score retrieval on a benchmark's queries and gold passages. Without "
                                     "--index, the task's corpus is indexed once into the cache.")
    e.add_argument("--task", required=True, choices=TASKS, help="hotpotqa (66,581 paragraphs) or doc2dial")
    e.add_argument("--index", default=None,
                   help="an index of the task's corpus (default: build it in the cache)")
    e.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    e.add_argument("--embedder", default=None,
                   help=f"{EMBEDDER_HELP} (default: the index's; minilm for a task index built here)")
    e.add_argument("--kind", choices=KINDS, default="auto", help="FAISS kind of a task index built here")
    e.add_argument("--limit", type=int, default=None, help="a seeded sample of N queries (default: all)")
    e.add_argument("--seed", type=int, default=0, help="draws the --limit (and --answers) sample")
    e.add_argument("--model", default=None,
                   help="hotpotqa: also score this model's answers (EM/F1) closed book, from the retrieved "
                        "passages and from the gold paragraphs")
    e.add_argument("--answers", type=int, default=200, help="questions answered with --model (default: 200)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    add_threads_flag(e)
    e.set_defaults(func=cmd_eval)
