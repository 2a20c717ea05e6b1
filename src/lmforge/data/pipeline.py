"""`prepare`: input files -> clean, deduplicated, PII-scrubbed training documents.

The run has three phases, because near-duplicates must be found across *all* documents
while everything else is local to a shard:

1. **filter** (parallel, per shard): read -> URL filter -> extract (trafilatura) ->
   language -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> fingerprint.
   Survivors go to ``_work/filtered/part-NNNNN.parquet``; their exact hash and MinHash
   band keys to ``part-NNNNN.npz`` beside it.
2. **dedup** (one process, whole run): load every shard's keys in shard order, cluster
   candidates with union-find, keep the first document of each cluster, and write
   per-shard lists of rows to drop. Only 16 + 8*bands bytes per document are loaded.
3. **finish** (parallel, per shard): drop the duplicates, redact PII, write the output
   shard ``part-NNNNN.parquet`` (or ``.jsonl``).

**Resumability.** Each unit of work writes its output atomically (temporary name, then
rename) and only then a *done marker*, itself atomic, holding the unit's statistics.
A restarted run skips every unit with a marker and redoes the rest from scratch. Since
each unit's output depends only on its input and the config, the rerun writes the same
bytes an uninterrupted run would, and no document is lost or written twice. The plan
(inputs, shards, config) is saved with the first run; resuming with different inputs or
settings is refused rather than silently mixing two runs. Workers die with the main
process (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves no writer behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.atomic import atomic_write
from lmforge.data.dedup import DedupConfig, MinHasher, exact_key, find_duplicates
from lmforge.data.document import Document, Stage, StageStats, run_stages
from lmforge.data.errors import DataInputError, RunStateError
from lmforge.data.extract import ExtractConfig, Extractor
from lmforge.data.filters import (
    C4Config,
    C4Filter,
    FineWebConfig,
    FineWebFilter,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
    LanguageConfig,
    LanguageFilter,
    UrlFilter,
    UrlFilterConfig,
)
from lmforge.data.pii import PiiConfig, PiiRedactor
from lmforge.data.readers import InputFile, discover_inputs, read_input
from lmforge.data.report import RunReport, merge_stats, render_table
from lmforge.data.writers import DocumentWriter

PLAN_VERSION = 1
STAGE_ORDER = ["read", "url_filter", "extract", "language", "gopher_repetition", "gopher_quality", "c4",
               "fineweb", "dedup", "pii", "write"]
WORK = "_work"


@dataclass
class PrepareConfig:
    """Everything `lmforge prepare` does, with FineWeb's published settings as defaults."""

    input_format: Literal["auto", "warc", "html", "text", "rst", "jsonl", "parquet"] = "auto"
    output_format: Literal["parquet", "jsonl"] = "parquet"
    workers: int = 1  # processes; does not change the output
    shards: int = 0  # 0: one shard per `shard_mb` of input (at least 8, at most one per file)
    shard_mb: float = 8.0
    keep_intermediate: bool = False  # keep _work/filtered after a complete run
    url_filter: UrlFilterConfig = field(default_factory=UrlFilterConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)

    def fingerprint(self) -> str:
        """Hash of every setting that changes the output (not workers or housekeeping)."""
        values = dataclasses.asdict(self)
        for key in ("workers", "keep_intermediate"):
            values.pop(key)
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- planning
@dataclass
class Shard:
    index: int
    files: list[InputFile]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def plan_shards(files: Sequence[InputFile], shards: int = 0, shard_mb: float = 8.0) -> list[Shard]:
    """Split the sorted input files into contiguous shards of about equal size.

    The plan depends only on the inputs and the settings, never on the worker count, so
    any number of workers (and any resumed run) processes the same shards.
    """
    total = sum(f.size for f in files)
    if shards <= 0:
        shards = max(min(8, len(files)), math.ceil(total / (shard_mb * 1e6)))
    shards = max(1, min(shards, len(files)))
    plan: list[Shard] = [Shard(0, [])]
    done = 0
    for position, item in enumerate(files):
        remaining_files = len(files) - position
        remaining_shards = shards - len(plan)
        target = total * len(plan) / shards  # cumulative size at which the current shard is full
        must_split = remaining_files <= remaining_shards  # every later shard needs one file
        if plan[-1].files and len(plan) < shards and (done >= target or must_split):
            plan.append(Shard(len(plan), []))
        plan[-1].files.append(item)
        done += item.size
    return plan


# ---------------------------------------------------------------------------- stages
def filter_stages(config: PrepareConfig) -> list[Stage]:
    """The phase-1 stages in FineWeb's order, leaving out the disabled ones."""
    stages: list[Stage] = []
    if config.url_filter.enabled:
        stages.append(UrlFilter(config.url_filter))
    if config.extract.enabled:
        stages.append(Extractor(config.extract))
    if config.language.enabled:
        stages.append(LanguageFilter(config.language))
    if config.gopher_repetition.enabled:
        stages.append(GopherRepetition(config.gopher_repetition))
    if config.gopher_quality.enabled:
        stages.append(GopherQuality(config.gopher_quality))
    if config.c4.enabled:
        stages.append(C4Filter(config.c4))
    if config.fineweb.enabled:
        stages.append(FineWebFilter(config.fineweb))
    return stages


class Fingerprinter:
    """Stage ``dedup`` (phase-1 half): remember each survivor's exact hash and band keys."""

    name = "dedup"

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.hasher = MinHasher(config.minhash) if config.minhash.enabled else None
        self.exact: list[bytes] = []
        self.bands: list[np.ndarray] = []

    def __call__(self, doc: Document) -> str | None:
        self.exact.append(exact_key(doc.text))
        if self.hasher is not None:
            self.bands.append(self.hasher.band_keys(self.hasher.signature(doc.text)))
        return None

    def save(self, path: Path) -> None:
        bands = self.config.minhash.bands
        exact = np.array(self.exact, dtype="S16") if self.exact else np.zeros(0, dtype="S16")
        band_keys = np.stack(self.bands) if self.bands else np.zeros((0, bands), dtype=np.uint64)
        buffer = io.BytesIO()
        np.savez(buffer, exact=exact, bands=band_keys)
        with atomic_write(path) as f:
            f.write(buffer.getvalue())


_STAGE_CACHE: dict[str, list[Stage]] = {}


def _write_text(path: Path, text: str) -> None:
    """A marker or report, never seen half-written."""
    with atomic_write(path, "w") as f:
        f.write(text)


def _cached_filter_stages(config: PrepareConfig) -> list[Stage]:
    """Build the stages once per process: loading trafilatura and fastText is not free."""
    key = config.fingerprint()
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = filter_stages(config)
    return _STAGE_CACHE[key]


# ---------------------------------------------------------------------------- run folder
class RunFolder:
    """Names of everything a run writes under its output folder."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.work = output / WORK

    def filtered(self, shard: Shard) -> Path:
        return self.work / "filtered" / f"{shard.name}.parquet"

    def keys(self, shard: Shard) -> Path:
        return self.work / "filtered" / f"{shard.name}.npz"

    def filter_done(self, shard: Shard) -> Path:
        return self.work / "filtered" / f"{shard.name}.done.json"

    def drops(self, shard: Shard) -> Path:
        return self.work / "dedup" / f"{shard.name}.json"

    @property
    def dedup_done(self) -> Path:
        return self.work / "dedup" / "done.json"

    def final(self, shard: Shard, fmt: str) -> Path:
        return self.output / f"{shard.name}.{fmt}"

    def final_done(self, shard: Shard) -> Path:
        return self.work / "final" / f"{shard.name}.done.json"

    @property
    def plan(self) -> Path:
        return self.work / "plan.json"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(data, indent=1))


# ---------------------------------------------------------------------------- shard work
@dataclass
class ShardJob:
    output: str
    shard: Shard
    config: PrepareConfig


def _timed(items: Iterable[Document], stats: StageStats) -> Iterator[Document]:
    """Add the time spent producing each item (reading, decoding) to `stats.seconds`."""
    iterator = iter(items)
    clock = time.perf_counter
    while True:
        started = clock()
        try:
            item = next(iterator)
        except StopIteration:
            stats.seconds += clock() - started
            return
        stats.seconds += clock() - started
        yield item


def filter_shard(job: ShardJob) -> dict[str, Any]:
    """Phase 1 for one shard; returns (and saves in the done marker) its statistics."""
    folder, shard, config = RunFolder(Path(job.output)), job.shard, job.config
    started = time.perf_counter()
    stats: dict[str, StageStats] = {"read": StageStats("read")}
    docs = chain.from_iterable(read_input(item, stats["read"]) for item in shard.files)
    fingerprint = Fingerprinter(config.dedup)
    stages = [*_cached_filter_stages(config), fingerprint]
    path = folder.filtered(shard)
    with DocumentWriter(path, "parquet") as out:
        for doc in run_stages(_timed(docs, stats["read"]), stages, stats):
            out.write(doc)
    fingerprint.save(folder.keys(shard))
    result = {"shard": shard.index, "docs_out": out.count, "bytes_in": shard.size,
              "seconds": time.perf_counter() - started, "stats": [s.to_dict() for s in stats.values()]}
    _write_marker(folder.filter_done(shard), result)
    return result


def dedup_run(folder: RunFolder, plan: list[Shard], config: PrepareConfig) -> dict[str, Any]:
    """Phase 2: find duplicates over the whole run and write each shard's rows to drop."""
    started = time.perf_counter()
    exact_parts, band_parts, sizes = [], [], []
    for shard in plan:
        with np.load(folder.keys(shard)) as keys:
            exact_parts.append(keys["exact"])
            band_parts.append(keys["bands"])
            sizes.append(len(keys["exact"]))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    exact = np.concatenate(exact_parts) if config.dedup.exact else None
    bands = np.concatenate(band_parts) if config.dedup.minhash.enabled else None
    duplicates = find_duplicates(exact, bands)
    per_shard: dict[int, list[list[Any]]] = {s.index: [] for s in plan}
    stats = StageStats("dedup")
    def locate(index: int) -> tuple[int, int]:
        shard_index = int(np.searchsorted(offsets, index, side="right") - 1)
        return shard_index, int(index - offsets[shard_index])

    for index, (kept, reason) in sorted(duplicates.items()):
        shard_index, row = locate(index)
        # [row to drop, why, shard and row of the document kept in its place]
        per_shard[shard_index].append([row, reason, *locate(kept)])
        stats.dropped[reason] += 1
    for shard in plan:
        drops = folder.drops(shard)
        drops.parent.mkdir(parents=True, exist_ok=True)
        _write_text(drops, json.dumps(per_shard[shard.index]))
    stats.seconds = time.perf_counter() - started
    stats.counters["clusters_with_duplicates"] = len({root for root, _ in duplicates.values()})
    result = {"seconds": stats.seconds, "stats": stats.to_dict()}
    _write_marker(folder.dedup_done, result)
    return result


def finish_shard(job: ShardJob) -> dict[str, Any]:
    """Phase 3 for one shard: drop duplicates, redact PII, write the output shard."""
    folder, shard, config = RunFolder(Path(job.output)), job.shard, job.config
    started = time.perf_counter()
    drop_rows = {entry[0] for entry in json.loads(folder.drops(shard).read_text(encoding="utf-8"))}
    stats: dict[str, StageStats] = {}
    stages: list[Stage] = [PiiRedactor(config.pii)] if config.pii.enabled else []
    source = InputFile(str(folder.filtered(shard)), shard.name, "parquet", 0)
    rows = enumerate(read_input(source, StageStats("reread")))
    survivors = (doc for row, doc in rows if row not in drop_rows)
    write = stats.setdefault("write", StageStats("write"))
    path = folder.final(shard, config.output_format)
    with DocumentWriter(path, config.output_format) as out:
        for doc in run_stages(survivors, stages, stats):
            tick = time.perf_counter()
            out.write(doc)
            write.docs_in += 1
            write.kept += 1
            write.chars_in += len(doc.text)
            write.chars_out += len(doc.text)
            write.seconds += time.perf_counter() - tick
    result = {"shard": shard.index, "docs_out": out.count, "chars_out": out.chars,
              "file": path.name, "seconds": time.perf_counter() - started,
              "stats": [s.to_dict() for s in stats.values()]}
    _write_marker(folder.final_done(shard), result)
    return result


# ---------------------------------------------------------------------------- workers
def _die_with_parent(parent: int) -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when the main
    process dies, so a killed run leaves no orphan writing files.

    A spawned worker gets here only after its imports; if the main process died in the
    meantime the request comes too late (the worker already has a new parent), so the
    worker checks and exits by itself."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


@dataclass
class ProgressEvent:
    """What the pipeline tells its caller: a phase starts, a shard finishes, a phase ends."""

    kind: Literal["phase_start", "shard_done", "phase_end", "message"]
    phase: str
    done: int = 0
    total: int = 0
    docs: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    text: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def _run_jobs(phase: str, work: Callable[[ShardJob], dict[str, Any]], jobs: list[ShardJob], workers: int,
              progress: ProgressCallback, already: int, total: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    progress(ProgressEvent("phase_start", phase, done=already, total=total))
    results: list[dict[str, Any]] = []
    docs = nbytes = 0

    def record(result: dict[str, Any]) -> None:
        nonlocal docs, nbytes
        results.append(result)
        docs += _docs_read(result)
        nbytes += result.get("bytes_in", 0)
        progress(ProgressEvent("shard_done", phase, done=already + len(results), total=total, docs=docs,
                               bytes=nbytes, elapsed=time.perf_counter() - started))

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            record(work(job))
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(work, job) for job in jobs]
            for future in as_completed(futures):
                record(future.result())
    progress(ProgressEvent("phase_end", phase, done=already + len(results), total=total, docs=docs,
                           bytes=nbytes, elapsed=time.perf_counter() - started))
    return results


def _docs_read(result: dict[str, Any]) -> int:
    for stats in result.get("stats", []):
        if stats["name"] == "read":
            return stats["kept"]
    return result.get("docs_out", 0)


# ---------------------------------------------------------------------------- the run
def _plan_record(files: list[InputFile], plan: list[Shard], config: PrepareConfig) -> dict[str, Any]:
    return {"version": PLAN_VERSION, "config": config.fingerprint(), "output_format": config.output_format,
            "inputs": [[f.name, f.path, f.size] for f in files],
            "shards": [[f.name for f in s.files] for s in plan]}


@contextlib.contextmanager
def _locked(folder: RunFolder) -> Iterator[None]:
    """One run per output folder at a time (an advisory lock the kernel drops if we die)."""
    folder.work.mkdir(parents=True, exist_ok=True)
    with open(folder.work / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunStateError(f"another lmforge prepare is writing to {folder.output}") from None
        yield


def _remove_stale_temporaries(folder: RunFolder) -> None:
    for root in (folder.output, folder.work / "filtered", folder.work / "dedup", folder.work / "final"):
        if root.is_dir():
            for tmp in root.glob("*.tmp"):
                tmp.unlink(missing_ok=True)


def _quiet(_: ProgressEvent) -> None:
    return None


def prepare(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
            config: PrepareConfig | None = None, *, overwrite: bool = False,
            progress: ProgressCallback | None = None) -> RunReport:
    """Run (or resume) the whole pipeline; returns the report, also saved as
    ``report.json`` and ``report.txt`` in `output`."""
    config = config or PrepareConfig()
    progress = progress or _quiet
    started = time.perf_counter()
    folder = RunFolder(Path(output).expanduser().resolve())
    files = discover_inputs(inputs, config.input_format, exclude=folder.output)
    plan = plan_shards(files, config.shards, config.shard_mb)
    if folder.output.exists() and not folder.output.is_dir():
        raise DataInputError(f"output {folder.output} exists and is not a folder")
    with _locked(folder):
        if overwrite:
            _clear_run(folder)
        record = _plan_record(files, plan, config)
        saved = _read_marker(folder.plan)
        if saved is None:
            if any(folder.output.glob("part-*")):
                raise RunStateError(f"{folder.output} already holds output shards but no run plan; "
                                    "choose an empty folder or pass --overwrite")
            _write_marker(folder.plan, record)
        elif saved != record:
            what = "settings" if saved.get("inputs") == record["inputs"] else "input files"
            raise RunStateError(f"{folder.output} holds a run with different {what}; resume it with the "
                                "same inputs and config, choose another --output, or pass --overwrite "
                                "to start over")
        _remove_stale_temporaries(folder)
        return _execute(folder, files, plan, config, progress, started)


def _clear_run(folder: RunFolder) -> None:
    """Remove what a previous run wrote (never other files in the folder); keeps the lock."""
    for name in ("filtered", "dedup", "final", "plan.json"):
        path = folder.work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for pattern in ("part-*.parquet", "part-*.jsonl", "report.json", "report.txt"):
        for path in folder.output.glob(pattern):
            path.unlink()


def _execute(folder: RunFolder, files: list[InputFile], plan: list[Shard], config: PrepareConfig,
             progress: ProgressCallback, started: float) -> RunReport:
    phase_seconds: dict[str, float] = {}
    final_markers = {s.index: _read_marker(folder.final_done(s)) for s in plan}
    finished = [s for s in plan if final_markers[s.index] is not None
                and folder.final(s, config.output_format).exists()]
    dedup_marker = _read_marker(folder.dedup_done)

    # Phase 1: only needed while some shard is unfinished and dedup has not run.
    filter_markers = {s.index: _read_marker(folder.filter_done(s)) for s in plan}
    resumed = sum(1 for s in plan if filter_markers[s.index] is not None or s in finished)
    if len(finished) < len(plan) and dedup_marker is None:
        todo = [s for s in plan if filter_markers[s.index] is None
                or not folder.filtered(s).exists() or not folder.keys(s).exists()]
        tick = time.perf_counter()
        jobs = [ShardJob(str(folder.output), s, config) for s in todo]
        for result in _run_jobs("filter", filter_shard, jobs, config.workers, progress,
                                len(plan) - len(todo), len(plan)):
            filter_markers[result["shard"]] = result
        phase_seconds["filter"] = time.perf_counter() - tick
    missing = [s.name for s in plan if filter_markers[s.index] is None]
    if missing:
        raise RunStateError(f"{folder.output}: filter results of {', '.join(missing[:3])} are missing "
                            "although later phases ran; pass --overwrite to start over")

    # Phase 2: global deduplication.
    if dedup_marker is None:
        tick = time.perf_counter()
        progress(ProgressEvent("phase_start", "dedup", total=1))
        dedup_marker = dedup_run(folder, plan, config)
        phase_seconds["dedup"] = time.perf_counter() - tick
        progress(ProgressEvent("phase_end", "dedup", done=1, total=1, elapsed=phase_seconds["dedup"]))

    # Phase 3: drop duplicates, redact, write.
    todo = [s for s in plan if s not in finished]
    tick = time.perf_counter()
    for result in _run_jobs("finish", finish_shard, [ShardJob(str(folder.output), s, config) for s in todo],
                            config.workers, progress, len(finished), len(plan)):
        final_markers[result["shard"]] = result
    phase_seconds["finish"] = time.perf_counter() - tick

    report = _build_report(folder, files, plan, config, filter_markers, dedup_marker, final_markers, resumed)
    report.wall_seconds = time.perf_counter() - started
    report.phase_seconds = phase_seconds
    _write_text(folder.output / "report.json", json.dumps(report.to_dict(), indent=2))
    _write_text(folder.output / "report.txt", render_table(report) + "\n")
    if not config.keep_intermediate:
        for shard in plan:
            folder.filtered(shard).unlink(missing_ok=True)
    return report


def _build_report(folder: RunFolder, files: list[InputFile], plan: list[Shard], config: PrepareConfig,
                  filter_markers: dict[int, Any], dedup_marker: dict[str, Any],
                  final_markers: dict[int, Any], resumed: int) -> RunReport:
    records: list[dict[str, Any]] = []
    for marker in filter_markers.values():
        records.extend(marker["stats"])
    dedup_stats = StageStats.from_dict(dedup_marker["stats"])
    records.append({**dedup_stats.to_dict(), "docs_in": 0, "kept": -dedup_stats.dropped_total, "chars_in": 0})
    for marker in final_markers.values():
        records.extend(marker["stats"])
    stages = merge_stats(records, STAGE_ORDER)
    return RunReport(
        output=str(folder.output), stages=stages, input_files=len(files),
        input_bytes=sum(f.size for f in files),
        shards=len(plan), shards_resumed=resumed,
        docs_written=sum(m["docs_out"] for m in final_markers.values()),
        chars_written=sum(m["chars_out"] for m in final_markers.values()),
        output_files=[m["file"] for m in sorted(final_markers.values(), key=lambda m: m["shard"])])


if __name__ == "__main__":  # pragma: no cover - `python -m lmforge.data.pipeline IN... OUT`
    print(render_table(prepare(sys.argv[1:-1], sys.argv[-1])))
