"""Dedup memory per task as the corpus grows: the on-disk stages stay flat.

A synthetic corpus of short documents made by mutating real text (the Python 3.11 docs'
reST sources and the Debian handbook's English pages, from lmforge's data samples):

- 80% *fresh*: a window of 30-80 consecutive words at a random place in the real text,
  with 15% of its words replaced by other real words (so two windows that overlap are
  still different documents: their 5-gram Jaccard stays far below the LSH threshold);
- 10% *exact copies* of an earlier document;
- 10% *near copies*: an earlier document with 1-3 words replaced.

Each size runs `lmforge prepare` with every filter off and only deduplication on (exact
and MinHash), on the local executor, and reads each task's peak resident memory from
the run's markers (a task's peak is its process's, reset when the task starts): the
filter tasks (read, fingerprint, write one shard), the bucket tasks (one per LSH band or
exact partition, merging every shard's sorted run), the clustering task, and the finish
tasks. With ``--in-memory`` it also times the former design on the same keys: every
document's exact hash and band keys loaded into one process and clustered there
(`lmforge.data.dedup.find_duplicates`), measured the same way.

    python benchmarks/bench_dedup_scaling.py --sizes 20000 --workers 1        # smoke, ~1 min
    python benchmarks/bench_dedup_scaling.py --sizes 125000,500000,2000000 --in-memory
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine import announce

from lmforge.data.dedup import find_duplicates
from lmforge.data.dedup_stages import DedupLayout
from lmforge.data.executors import LocalExecutor, TaskMemory
from lmforge.data.pipeline import PrepareConfig, prepare
from lmforge.data.samples import debian_handbook_dir, python_docs_dir

ANCHORS: tuple[str, ...] = ()  # lmforge against its own former in-memory design
DOCS_PER_FILE = 25_000  # ~9 MB of JSONL: one shard each


def real_words() -> list[str]:
    """Words of real pages: the Python docs' reST sources and the handbook's English pages."""
    from lmforge.data.document import Document
    from lmforge.data.extract import Extractor

    words: list[str] = []
    for path in sorted((python_docs_dir() / "_sources").rglob("*.rst.txt")):
        words += path.read_text(encoding="utf-8", errors="replace").split()
    extract = Extractor()
    for path in sorted((debian_handbook_dir() / "en-US").glob("*.html")):
        doc = Document(id=path.name, text=path.read_text(encoding="utf-8"), metadata={"content_type": "html"})
        if extract(doc) is None:
            words += doc.text.split()
    return words


def write_corpus(folder: Path, size: int, words: list[str], seed: int = 0) -> None:
    """`size` documents in JSONL files of `DOCS_PER_FILE`, made as the module docstring says."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(words, dtype=object)
    kinds = rng.choice(3, size=size, p=[0.8, 0.1, 0.1])
    docs: list[list[str]] = []
    handle = None
    for i in range(size):
        if i % DOCS_PER_FILE == 0:
            if handle:
                handle.close()
            handle = open(folder / f"docs-{i // DOCS_PER_FILE:05d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        if kinds[i] == 0 or i == 0:
            length = int(rng.integers(30, 81))
            start = int(rng.integers(0, len(words) - length))
            doc = list(vocabulary[start:start + length])
            swap = np.nonzero(rng.random(length) < 0.15)[0]
            for position, word in zip(swap, vocabulary[rng.integers(0, len(words), len(swap))]):
                doc[position] = word
        elif kinds[i] == 1:
            doc = docs[int(rng.integers(0, i))]
        else:
            doc = list(docs[int(rng.integers(0, i))])
            for position in rng.integers(0, len(doc), int(rng.integers(1, 4))):
                doc[position] = vocabulary[int(rng.integers(0, len(words)))]
        docs.append(doc)
        handle.write(json.dumps({"id": f"d{i}", "text": " ".join(doc)}) + "\n")
    if handle:
        handle.close()


def dedup_only(workers: int) -> PrepareConfig:
    config = PrepareConfig(workers=workers, keep_intermediate=True)
    for name in ("url_filter", "extract", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                 "pii"):
        getattr(config, name).enabled = False
    return config


def task_memory(out: Path) -> dict[str, dict[str, float]]:
    """Per kind of task: how many ran, the largest peak RSS and the largest growth during a task."""
    kinds = {"filter": "_work/filtered/*.done.json", "bucket": "_work/buckets/*.done.json",
             "cluster": "_work/dedup/done.json", "finish": "_work/final/*.done.json"}
    table = {}
    for kind, pattern in kinds.items():
        memory = [json.loads(p.read_text())["memory"] for p in out.glob(pattern)]
        table[kind] = {"tasks": len(memory), "peak_mb": max(m["rss_peak_mb"] for m in memory),
                       "growth_mb": max(m["rss_peak_mb"] - m["rss_start_mb"] for m in memory)}
    return table


def in_memory_dedup(out: Path, shards: int) -> dict[str, float]:
    """The former design: the whole run's keys in one process, clustered there."""
    layout = DedupLayout(out / "_work")
    started = time.perf_counter()
    with TaskMemory() as memory:
        exact_parts, band_parts = [], []
        for shard in (f"part-{i:05d}" for i in range(shards)):
            exact, rows = np.load(layout.keys(shard, "exact")), np.load(layout.rows(shard, "exact"))
            exact_parts.append(exact[np.argsort(rows)])
            keys, rows = np.load(layout.keys(shard, "minhash")), np.load(layout.rows(shard, "minhash"))
            bands = np.zeros((len(exact), keys.shape[0]), dtype=np.uint64)
            for band in range(keys.shape[0]):
                bands[rows[band], band] = keys[band]
            band_parts.append(bands)
        duplicates = find_duplicates(np.concatenate(exact_parts), np.concatenate(band_parts))
    return {"seconds": round(time.perf_counter() - started, 1), "duplicates": len(duplicates),
            "peak_mb": round(memory.peak_mb, 1), "growth_mb": round(memory.peak_mb - memory.start_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="125000,500000,2000000", help="corpus sizes (documents)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-memory", action="store_true", help="also run the former in-memory clustering")
    parser.add_argument("--tmp", default=None, help="folder for corpus and run (default: system temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    machine = announce(file=sys.stderr if args.json else sys.stdout)
    words = real_words()
    print(f"{len(words):,} real words to mutate", file=sys.stderr)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            corpus, out = Path(tmp) / "corpus", Path(tmp) / "out"
            corpus.mkdir()
            tick = time.perf_counter()
            write_corpus(corpus, size, words)
            made = time.perf_counter() - tick
            tick = time.perf_counter()
            with LocalExecutor(args.workers) as executor:
                report = prepare([corpus], out, dedup_only(args.workers), executor=executor)
            seconds = time.perf_counter() - tick
            dedup = next(s for s in report.stages if s.name == "dedup")
            row = {"documents": size, "shards": report.shards, "corpus_seconds": round(made, 1),
                   "prepare_seconds": round(seconds, 1), "phase_seconds": report.phase_seconds,
                   "dropped": dict(dedup.dropped), "written": report.docs_written,
                   "tasks": task_memory(out)}
            if args.in_memory:  # in a fresh process, so that its peak is its own
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                    row["in_memory"] = fresh.submit(in_memory_dedup, out, report.shards).result()
                assert row["in_memory"]["duplicates"] == dedup.dropped_total, "the two designs disagree"
            shutil.rmtree(out)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"machine": machine, "workers": args.workers, "runs": rows}, indent=2))
        return
    print(f"workers={args.workers}; peak RSS of the largest task of each kind, MB (growth during the task)")
    header = f"{'documents':>10} {'shards':>6} {'seconds':>8} {'dropped':>9}"
    header += "".join(f" {kind:>15}" for kind in ("filter", "bucket", "cluster", "finish"))
    header += f" {'in-memory':>15}" if args.in_memory else ""
    print(header)
    for row in rows:
        line = (f"{row['documents']:>10,} {row['shards']:>6} {row['prepare_seconds']:>8.1f} "
                f"{sum(row['dropped'].values()):>9,}")
        for kind in ("filter", "bucket", "cluster", "finish"):
            task = row["tasks"][kind]
            line += f" {task['peak_mb']:>7.0f} ({task['growth_mb']:>4.0f})"
        if args.in_memory:
            line += f" {row['in_memory']['peak_mb']:>7.0f} ({row['in_memory']['growth_mb']:>4.0f})"
        print(line)


if __name__ == "__main__":
    main()
