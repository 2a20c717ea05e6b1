"""`prepare`: input files -> clean, deduplicated, PII-scrubbed training documents.

The run has three phases, because near-duplicates must be found across *all* documents
while everything else is local to a shard. Every phase is a list of tasks that an
executor runs (`lmforge.data.executors`: local processes or a Ray cluster); tasks hand
their results to later ones through files under the output folder only.

1. **filter** (a task per shard): read -> URL filter -> extract (trafilatura) ->
   language -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> fingerprint.
   Survivors go to ``_work/filtered/part-NNNNN.parquet``; their exact hashes and MinHash
   band keys, sorted, to ``_work/keys/``.
2. **dedup** (a task per LSH band and per exact-hash partition, then one clustering
   task): the on-disk stages of `lmforge.data.dedup_stages`, which write per-shard lists
   of rows to drop. No task holds the whole run's keys in memory.
3. **finish** (a task per shard): drop the duplicates, redact PII, write the output
   shard ``part-NNNNN.parquet`` (or ``.jsonl``).

**Resumability.** Each unit of work writes its output atomically (temporary name, then
rename) and only then a *done marker*, itself atomic, holding the unit's statistics.
A restarted run skips every unit with a marker and redoes the rest from scratch. Since
each unit's output depends only on its input and the config, the rerun writes the same
bytes an uninterrupted run would, and no document is lost or written twice. The plan
(inputs, shards, config) is saved with the first run; resuming with different inputs or
settings is refused rather than silently mixing two runs. Local workers die with the main
process (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves no writer behind; a Ray task
whose worker dies is run again by Ray, and writes the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

from lmforge.atomic import atomic_write
from lmforge.data.dedup import DedupConfig
from lmforge.data.dedup_stages import (
    BucketJob,
    ClusterJob,
    DedupLayout,
    Fingerprinter,
    bucket_task,
    cluster_task,
    families,
    partitions,
    signature_files,
)
from lmforge.data.document import Document, Stage, StageStats, run_stages
from lmforge.data.errors import DataInputError, RunStateError
from lmforge.data.executors import Executor, LocalExecutor, TaskMemory
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

PLAN_VERSION = 2  # 2: the dedup index on disk (sorted runs, buckets, clusters)
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
        self.dedup = DedupLayout(self.work)

    def filtered(self, shard: Shard) -> Path:
        return self.work / "filtered" / f"{shard.name}.parquet"

    def filter_done(self, shard: Shard) -> Path:
        return self.work / "filtered" / f"{shard.name}.done.json"

    def drops(self, shard: Shard) -> Path:
        return self.dedup.drops(shard.name)

    @property
    def dedup_done(self) -> Path:
        return self.dedup.done

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
    with TaskMemory() as memory:
        stats: dict[str, StageStats] = {"read": StageStats("read")}
        docs = chain.from_iterable(read_input(item, stats["read"]) for item in shard.files)
        fingerprint = Fingerprinter(config.dedup)
        stages = [*_cached_filter_stages(config), fingerprint]
        path = folder.filtered(shard)
        with DocumentWriter(path, "parquet") as out:
            for doc in run_stages(_timed(docs, stats["read"]), stages, stats):
                out.write(doc)
        fingerprint.save(folder.dedup, shard.name)
    result = {"shard": shard.index, "docs_out": out.count, "bytes_in": shard.size,
              "seconds": time.perf_counter() - started, "memory": memory.to_dict(),
              "stats": [s.to_dict() for s in stats.values()]}
    _write_marker(folder.filter_done(shard), result)
    return result


def dedup_jobs(folder: RunFolder, plan: list[Shard], config: PrepareConfig) -> list[BucketJob]:
    """Phase 2's bucket tasks: one per LSH band and one per exact-hash partition."""
    shards = [s.name for s in plan]
    return [BucketJob(str(folder.work), family, p, partitions(config.dedup, family), shards)
            for family in families(config.dedup) for p in range(partitions(config.dedup, family))]


def finish_shard(job: ShardJob) -> dict[str, Any]:
    """Phase 3 for one shard: drop duplicates, redact PII, write the output shard."""
    folder, shard, config = RunFolder(Path(job.output)), job.shard, job.config
    started = time.perf_counter()
    with TaskMemory() as memory:
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
              "file": path.name, "seconds": time.perf_counter() - started, "memory": memory.to_dict(),
              "stats": [s.to_dict() for s in stats.values()]}
    _write_marker(folder.final_done(shard), result)
    return result


# ---------------------------------------------------------------------------- running tasks
@dataclass
class ProgressEvent:
    """What the pipeline tells its caller: a phase starts, a task finishes, a phase ends."""

    kind: Literal["phase_start", "shard_done", "phase_end", "message"]
    phase: str
    done: int = 0
    total: int = 0
    docs: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    text: str = ""
    unit: str = "shard"


ProgressCallback = Callable[[ProgressEvent], None]


def run_tasks(phase: str, work: Callable[[Any], dict[str, Any]], jobs: Sequence[Any], executor: Executor,
              progress: ProgressCallback, already: int, total: int,
              unit: str = "shard") -> list[dict[str, Any]]:
    """Run one phase's tasks on `executor`, reporting each one as it finishes."""
    started = time.perf_counter()
    progress(ProgressEvent("phase_start", phase, done=already, total=total, unit=unit))
    results: list[dict[str, Any]] = []
    docs = nbytes = 0
    for result in executor.map(work, list(jobs)) if jobs else ():
        results.append(result)
        docs += _docs_read(result)
        nbytes += result.get("bytes_in", 0)
        progress(ProgressEvent("shard_done", phase, done=already + len(results), total=total, docs=docs,
                               bytes=nbytes, elapsed=time.perf_counter() - started, unit=unit))
    progress(ProgressEvent("phase_end", phase, done=already + len(results), total=total, docs=docs,
                           bytes=nbytes, elapsed=time.perf_counter() - started, unit=unit))
    return results


def _docs_read(result: dict[str, Any]) -> int:
    stages = result.get("stats", [])
    for stats in stages if isinstance(stages, list) else []:  # a shard's stages; a dedup task has one
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
    """Temporary files of writers that died (only called while no task of this run runs)."""
    for root in (folder.output, *(folder.work / name for name in ("filtered", "keys", "buckets", "dedup",
                                                                  "final"))):
        if root.is_dir():
            for tmp in root.glob("*.tmp"):
                tmp.unlink(missing_ok=True)


def _quiet(_: ProgressEvent) -> None:
    return None


def prepare(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
            config: PrepareConfig | None = None, *, overwrite: bool = False,
            progress: ProgressCallback | None = None, executor: Executor | None = None) -> RunReport:
    """Run (or resume) the whole pipeline; returns the report, also saved as
    ``report.json`` and ``report.txt`` in `output`.

    Tasks run on `executor` (default: `config.workers` local processes); the output does
    not depend on which executor runs them, or on how many workers it has."""
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
        if executor is not None:
            return _execute(folder, files, plan, config, progress, started, executor)
        with LocalExecutor(config.workers) as local:
            return _execute(folder, files, plan, config, progress, started, local)


def _clear_run(folder: RunFolder) -> None:
    """Remove what a previous run wrote (never other files in the folder); keeps the lock."""
    for name in ("filtered", "keys", "buckets", "dedup", "final", "plan.json"):
        path = folder.work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for pattern in ("part-*.parquet", "part-*.jsonl", "report.json", "report.txt"):
        for path in folder.output.glob(pattern):
            path.unlink()


def _execute(folder: RunFolder, files: list[InputFile], plan: list[Shard], config: PrepareConfig,
             progress: ProgressCallback, started: float, executor: Executor) -> RunReport:
    phase_seconds: dict[str, float] = {}
    final_markers = {s.index: _read_marker(folder.final_done(s)) for s in plan}
    finished = [s for s in plan if final_markers[s.index] is not None
                and folder.final(s, config.output_format).exists()]
    dedup_marker = _read_marker(folder.dedup_done)

    # Phase 1: only needed while some shard is unfinished and dedup has not run.
    filter_markers = {s.index: _read_marker(folder.filter_done(s)) for s in plan}
    resumed = sum(1 for s in plan if filter_markers[s.index] is not None or s in finished)
    if len(finished) < len(plan) and dedup_marker is None:
        todo = [s for s in plan if filter_markers[s.index] is None or not folder.filtered(s).exists()
                or not all(p.exists() for p in signature_files(folder.dedup, s.name, config.dedup))]
        tick = time.perf_counter()
        jobs = [ShardJob(str(folder.output), s, config) for s in todo]
        for result in run_tasks("filter", filter_shard, jobs, executor, progress, len(plan) - len(todo),
                                len(plan)):
            filter_markers[result["shard"]] = result
        phase_seconds["filter"] = time.perf_counter() - tick
    missing = [s.name for s in plan if filter_markers[s.index] is None]
    if missing:
        raise RunStateError(f"{folder.output}: filter results of {', '.join(missing[:3])} are missing "
                            "although later phases ran; pass --overwrite to start over")

    # Phase 2: global deduplication, on disk: bucket tasks, then one clustering task.
    bucket_markers: dict[tuple[str, int], Any] = {}
    if dedup_marker is None:
        tick = time.perf_counter()
        jobs = dedup_jobs(folder, plan, config)
        for job in jobs:
            marker = _read_marker(folder.dedup.pairs_done(job.family, job.partition))
            if marker is not None and folder.dedup.pairs(job.family, job.partition).exists():
                bucket_markers[job.family, job.partition] = marker
        todo_buckets = [j for j in jobs if (j.family, j.partition) not in bucket_markers]
        for result in run_tasks("dedup", bucket_task, todo_buckets, executor, progress,
                                len(jobs) - len(todo_buckets), len(jobs), unit="task"):
            bucket_markers[result["family"], result["partition"]] = result
        cluster = ClusterJob(str(folder.work), [s.name for s in plan],
                             [(j.family, j.partition) for j in jobs])
        [dedup_marker] = run_tasks("cluster", cluster_task, [cluster], executor, progress, 0, 1, unit="task")
        phase_seconds["dedup"] = time.perf_counter() - tick

    # Phase 3: drop duplicates, redact, write.
    todo = [s for s in plan if s not in finished]
    tick = time.perf_counter()
    for result in run_tasks("finish", finish_shard, [ShardJob(str(folder.output), s, config) for s in todo],
                            executor, progress, len(finished), len(plan)):
        final_markers[result["shard"]] = result
    phase_seconds["finish"] = time.perf_counter() - tick

    report = _build_report(folder, files, plan, config, filter_markers, dedup_marker, final_markers, resumed)
    report.wall_seconds = time.perf_counter() - started
    report.phase_seconds = phase_seconds
    report.task_peak_mb = _peak_memory({"filter": filter_markers.values(), "dedup": [*bucket_markers.values(),
                                        dedup_marker], "finish": final_markers.values()})
    _write_text(folder.output / "report.json", json.dumps(report.to_dict(), indent=2))
    _write_text(folder.output / "report.txt", render_table(report) + "\n")
    _remove_stale_temporaries(folder)  # left by workers that were killed and retried
    if not config.keep_intermediate:
        for shard in plan:
            folder.filtered(shard).unlink(missing_ok=True)
        for name in ("keys", "buckets"):
            shutil.rmtree(folder.work / name, ignore_errors=True)
    return report


def _peak_memory(markers: dict[str, Iterable[dict[str, Any] | None]]) -> dict[str, float]:
    """The largest per-task peak resident memory of each phase, in MB (tasks of earlier runs too)."""
    peaks = {}
    for phase, items in markers.items():
        values = [m["memory"]["rss_peak_mb"] for m in items if m and "memory" in m]
        if values:
            peaks[phase] = max(values)
    return peaks


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
