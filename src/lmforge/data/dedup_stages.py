"""Global deduplication as distributed stages, with the index on disk, not in memory.

datatrove's MinHash design (and NeMo Curator's), in four stages whose hand-offs are
files under the run's ``_work`` folder, so any executor can run them and a rerun skips
what is done:

1. **signatures** (inside each shard's filter task, `Fingerprinter`): every surviving
   document's 128-bit exact hash and its 14 LSH band keys (`lmforge.data.dedup`), saved
   per shard as *sorted runs*: ``keys/part-NNNNN.minhash.npy`` is a (bands, n) array,
   each band's keys sorted, with the documents' rows beside them; ``.exact.npy`` the
   exact hashes sorted (which also groups them by hash prefix, the exact partition).
2. **buckets** (one task per LSH band and one per exact-hash partition, `bucket_task`):
   a k-way merge of that band's (or partition's) sorted runs from every shard, read in
   blocks from memory-mapped files. Each run of equal keys is a bucket; every document
   in it is paired with the bucket's first one, and the pairs are appended to
   ``buckets/minhash-BBB.pairs`` (documents as ``shard << 32 | row``).
3. **clusters** (one task, `cluster_task`): union-find over the documents that appear
   in some pair, and only those. Each cluster keeps its smallest document (first in
   input order, as `find_duplicates` does in memory); the others are written per shard
   to ``dedup/part-NNNNN.json`` as ``[row, reason, kept shard, kept row]``. A document
   is an ``exact_duplicate`` when its exact-hash cluster (the exact pairs alone) holds
   the kept document too, else a ``near_duplicate``.
4. **filter** (per shard, `finish_shard` in `lmforge.data.pipeline`): drop those rows.

**Memory per task.** Stage 1 holds 128 bytes per document *of its shard*. A bucket
task holds one merge window of at most `WINDOW_ENTRIES` (2^18) keys with their
documents, sort order and bucket numbers, under 150 bytes each: ~40 MB, whatever the
corpus size. The shards' runs stay on disk and are read block by block (never left
memory-mapped: mapped file pages count as the process's memory too). The cluster task
holds about 24 bytes per document *that has a duplicate candidate*, plus one chunk of
`PAIR_CHUNK` pairs (16 MB): it grows with the number of duplicates, never with the
number of documents.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from lmforge.atomic import atomic_write
from lmforge.data.dedup import DedupConfig, MinHasher, exact_key
from lmforge.data.document import Document, StageStats
from lmforge.data.executors import TaskMemory

Family = Literal["exact", "minhash"]
EXACT_PARTITIONS = 16  # exact-hash partitions (tasks) by the hash's first two bytes
WINDOW_ENTRIES = 1 << 18  # keys in one merge window of a bucket task
PAIR_CHUNK = 1 << 20  # pairs read at once by the cluster task
_ROW_BITS = np.uint64(32)
_PAIR = np.dtype("<u8")  # a pairs file is (doc, anchor) uint64 pairs, little-endian, no header


def doc_id(shard: int, rows: np.ndarray) -> np.ndarray:
    """A document's place in the run as one sortable number: shard, then row."""
    return (np.uint64(shard) << _ROW_BITS) | rows.astype(np.uint64)


@dataclass
class DedupLayout:
    """Names of the dedup files under a run's ``_work`` folder."""

    work: Path

    def keys(self, shard: str, family: Family) -> Path:
        return self.work / "keys" / f"{shard}.{family}.npy"

    def rows(self, shard: str, family: Family) -> Path:
        return self.work / "keys" / f"{shard}.{family}-rows.npy"

    def pairs(self, family: Family, partition: int) -> Path:
        return self.work / "buckets" / f"{family}-{partition:03d}.pairs"

    def pairs_done(self, family: Family, partition: int) -> Path:
        return self.work / "buckets" / f"{family}-{partition:03d}.done.json"

    def drops(self, shard: str) -> Path:
        return self.work / "dedup" / f"{shard}.json"

    @property
    def done(self) -> Path:
        return self.work / "dedup" / "done.json"


def families(config: DedupConfig) -> list[Family]:
    return [f for f, on in (("exact", config.exact), ("minhash", config.minhash.enabled)) if on]


def partitions(config: DedupConfig, family: Family) -> int:
    return EXACT_PARTITIONS if family == "exact" else config.minhash.bands


# ---------------------------------------------------------------------------- 1. signatures
def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


class Fingerprinter:
    """Stage ``dedup`` (the shard's half): remember each survivor's exact hash and band keys,
    then save them as sorted runs for the bucket tasks. Never drops a document."""

    name = "dedup"

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.hasher = MinHasher(config.minhash) if config.minhash.enabled else None
        self.exact: list[bytes] = []
        self.bands: list[np.ndarray] = []

    def __call__(self, doc: Document) -> str | None:
        if self.config.exact:
            self.exact.append(exact_key(doc.text))
        if self.hasher is not None:
            self.bands.append(self.hasher.band_keys(self.hasher.signature(doc.text)))
        return None

    def save(self, layout: DedupLayout, shard: str) -> None:
        if self.config.exact:
            keys = np.array(self.exact, dtype="S16") if self.exact else np.zeros(0, dtype="S16")
            order = np.argsort(keys, kind="stable")
            _save_npy(layout.keys(shard, "exact"), keys[order])
            _save_npy(layout.rows(shard, "exact"), order.astype(np.uint32))
        if self.hasher is not None:
            bands = self.config.minhash.bands
            grid = np.stack(self.bands, axis=1) if self.bands else np.zeros((bands, 0), dtype=np.uint64)
            rows = np.nonzero(grid[0] != 0)[0]  # all-zero keys: a document without words, never matched
            grid = grid[:, rows]
            order = np.argsort(grid, axis=1, kind="stable")
            _save_npy(layout.keys(shard, "minhash"), np.take_along_axis(grid, order, axis=1))
            _save_npy(layout.rows(shard, "minhash"), rows[order].astype(np.uint32))


def signature_files(layout: DedupLayout, shard: str, config: DedupConfig) -> list[Path]:
    """What `Fingerprinter.save` writes: a shard is filtered only when all of it exists."""
    return [path for family in families(config)
            for path in (layout.keys(shard, family), layout.rows(shard, family))]


# ---------------------------------------------------------------------------- 2. buckets
class SortedRun:
    """One shard's sorted keys of one band (or exact partition) and their documents, read a
    block at a time. Each read maps the files and lets go again: file pages a process keeps
    mapped count in its resident memory, so a task that held every run mapped would grow
    with the corpus after all."""

    def __init__(self, layout: DedupLayout, shard: str, number: int, family: Family, partition: int,
                 count: int) -> None:
        self.keys_path, self.rows_path = layout.keys(shard, family), layout.rows(shard, family)
        self.number = number
        self.band = partition if family == "minhash" else None
        keys = np.load(self.keys_path, mmap_mode="r")
        if self.band is not None:
            self.lo, self.hi = 0, keys.shape[1]
        else:  # the exact partition: keys whose two-byte prefix falls in it (sorted keys: one slice)
            self.lo = _prefix_start(keys, partition, count)
            self.hi = _prefix_start(keys, partition + 1, count)

    def __len__(self) -> int:
        return self.hi - self.lo

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and document ids of entries start..stop (copies)."""
        part = slice(self.lo + start, self.lo + min(stop, len(self)))
        keys, rows = np.load(self.keys_path, mmap_mode="r"), np.load(self.rows_path, mmap_mode="r")
        if self.band is not None:
            keys, rows = keys[self.band], rows[self.band]
        return np.array(keys[part]), doc_id(self.number, np.array(rows[part]))


def _prefix_start(keys: np.ndarray, partition: int, count: int) -> int:
    """Index of the first sorted exact hash in `partition` of `count` (by two-byte prefix)."""
    if partition >= count:
        return len(keys)
    return int(np.searchsorted(keys, np.array((partition * 65536 // count).to_bytes(2, "big"), dtype="S16")))


class Run(Protocol):
    def __len__(self) -> int: ...

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


def equal_key_pairs(runs: Sequence[Run], window: int = WINDOW_ENTRIES) -> Iterator[np.ndarray]:
    """Merge sorted runs and yield, window by window, (m, 2) arrays of ``(doc, anchor)``:
    every document whose key equals an earlier document's in the merge, paired with its
    bucket's first one (or, for a bucket spanning windows, the first one seen).

    Each window reads the next block of every run and takes entries up to the smallest
    *last key* among the blocks that do not reach their run's end: everything at or below
    it has been read from every run, so the window holds whole buckets except possibly
    its last, which the next window continues (its anchor is carried over). At most
    `window` entries are in memory at once.
    """
    block = max(256, window // max(1, len(runs)))
    position = [0] * len(runs)
    live = [i for i, run in enumerate(runs) if len(run)]
    carry: tuple[Any, np.uint64] | None = None
    while live:
        blocks = {i: runs[i].block(position[i], position[i] + block) for i in live}
        partial = [blocks[i][0][-1] for i in live if position[i] + block < len(runs[i])]
        limit = min(partial) if partial else None
        key_parts, doc_parts = [], []
        for i in live:
            keys, docs = blocks.pop(i)
            take = len(keys) if limit is None else int(np.searchsorted(keys, limit, side="right"))
            key_parts.append(keys[:take])
            doc_parts.append(docs[:take])
            position[i] += take
        live = [i for i in live if position[i] < len(runs[i])]
        keys, docs = np.concatenate(key_parts), np.concatenate(doc_parts)
        del key_parts, doc_parts
        order = np.argsort(keys, kind="stable")
        keys, docs = keys[order], docs[order]
        del order
        starts = np.ones(len(keys), dtype=bool)
        starts[1:] = keys[1:] != keys[:-1]
        bucket = np.cumsum(starts) - 1
        anchors = docs[starts][bucket]
        if carry is not None and keys[0] == carry[0]:
            anchors[bucket == 0] = carry[1]  # the last window's last bucket goes on
        carry = (keys[-1], anchors[-1])
        duplicate = anchors != docs
        yield np.stack([docs[duplicate], anchors[duplicate]], axis=1)


@dataclass
class BucketJob:
    work: str
    family: Family
    partition: int
    partitions: int
    shards: list[str]  # in plan order: a shard's position is its number in document ids


def bucket_task(job: BucketJob) -> dict[str, Any]:
    """Stage 2 for one LSH band or exact partition: merge every shard's run, write the pairs."""
    layout = DedupLayout(Path(job.work))
    started = time.perf_counter()
    with TaskMemory() as memory:
        runs = [SortedRun(layout, shard, number, job.family, job.partition, job.partitions)
                for number, shard in enumerate(job.shards)]
        count = 0
        with atomic_write(layout.pairs(job.family, job.partition)) as out:
            for pairs in equal_key_pairs(runs, WINDOW_ENTRIES):
                out.write(pairs.astype(_PAIR, copy=False).tobytes())
                count += len(pairs)
    result = {"family": job.family, "partition": job.partition, "pairs": count,
              "seconds": time.perf_counter() - started, "memory": memory.to_dict()}
    _write_json(layout.pairs_done(job.family, job.partition), result)
    return result


# ---------------------------------------------------------------------------- 3. clusters
def _pair_chunks(path: Path) -> Iterator[np.ndarray]:
    """The pairs of a file, `PAIR_CHUNK` at a time (read, not mapped: see `SortedRun`)."""
    with open(path, "rb") as f:
        while True:
            chunk = np.fromfile(f, dtype=_PAIR, count=2 * PAIR_CHUNK)
            if not len(chunk):
                return
            yield chunk.reshape(-1, 2)


def _find(parent: np.ndarray, items: np.ndarray) -> np.ndarray:
    roots = parent[items]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of every pair (a[i], b[i]); each root is its set's smallest member.

    Vectorised union-find: find all roots, point each larger root at the smaller one
    (``np.minimum.at`` settles several pairs landing on one root), repeat for the pairs
    still split. Roots only ever point to smaller indices, so no cycle can form."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        split = ra != rb
        a, b, ra, rb = a[split], b[split], ra[split], rb[split]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
    _compress(parent)


def _compress(parent: np.ndarray) -> None:
    """Point every member straight at its root (path compression for the whole forest)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return
        parent[:] = up


@dataclass
class ClusterJob:
    work: str
    shards: list[str]
    buckets: list[tuple[Family, int]] = field(default_factory=list)


def cluster_task(job: ClusterJob) -> dict[str, Any]:
    """Stage 3: connected components over the pair files; each shard's rows to drop."""
    layout = DedupLayout(Path(job.work))
    started = time.perf_counter()
    with TaskMemory() as memory:
        files = {family: [layout.pairs(family, p) for f, p in job.buckets if f == family]
                 for family in ("exact", "minhash")}
        nodes = np.zeros(0, dtype=np.uint64)
        for path in files["exact"] + files["minhash"]:
            for chunk in _pair_chunks(path):
                nodes = np.union1d(nodes, chunk.ravel())
        parent = np.arange(len(nodes), dtype=np.int64)
        for family in ("exact", "minhash"):
            for path in files[family]:
                for chunk in _pair_chunks(path):
                    _union(parent, np.searchsorted(nodes, chunk[:, 0]), np.searchsorted(nodes, chunk[:, 1]))
            if family == "exact":
                exact_root = parent.copy()  # clusters of identical texts alone
        stats = _write_drops(layout, job.shards, nodes, parent, exact_root)
    bucket_seconds = sum(_read_json(layout.pairs_done(f, p))["seconds"] for f, p in job.buckets)
    stats.seconds = time.perf_counter() - started + bucket_seconds
    result = {"seconds": stats.seconds, "stats": stats.to_dict(), "memory": memory.to_dict()}
    _write_json(layout.done, result)
    return result


def _write_drops(layout: DedupLayout, shards: list[str], nodes: np.ndarray, root: np.ndarray,
                 exact_root: np.ndarray) -> StageStats:
    stats = StageStats("dedup")
    duplicate = np.nonzero(root != np.arange(len(nodes)))[0]  # nodes are in input order: kept = root
    exact = exact_root[duplicate] == root[duplicate]
    kept = nodes[root[duplicate]]
    shard_of = (nodes[duplicate] >> _ROW_BITS).astype(np.int64)
    bounds = np.searchsorted(shard_of, np.arange(len(shards) + 1))
    mask = np.uint64(0xFFFFFFFF)
    for number, shard in enumerate(shards):
        part = slice(bounds[number], bounds[number + 1])
        rows = (nodes[duplicate[part]] & mask).tolist()
        reasons = ["exact_duplicate" if e else "near_duplicate" for e in exact[part].tolist()]
        entries = [[row, reason, k >> 32, k & 0xFFFFFFFF]
                   for row, reason, k in zip(rows, reasons, kept[part].tolist())]
        stats.dropped.update(reasons)
        _write_json(layout.drops(shard), entries, indent=None)
    stats.counters["clusters_with_duplicates"] = len(np.unique(root[duplicate]))
    return stats


def _write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(data, indent=indent))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
