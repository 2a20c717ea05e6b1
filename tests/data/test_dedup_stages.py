"""The on-disk dedup stages find exactly what the in-memory `find_duplicates` finds, with
merge windows and pair chunks small enough that buckets and clusters span many of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.data import dedup_stages
from lmforge.data.dedup import DedupConfig, MinHashConfig, find_duplicates
from lmforge.data.dedup_stages import (
    BucketJob,
    ClusterJob,
    DedupLayout,
    Fingerprinter,
    bucket_task,
    cluster_task,
    equal_key_pairs,
    families,
    partitions,
)

SHARDS = [f"part-{i:05d}" for i in range(5)]


def random_keys(rng: np.random.Generator, sizes: list[int], bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact hashes drawn from 300 texts and band keys from 40 values per band, so that most
    documents collide somewhere; one document in 20 has no signature (all-zero bands)."""
    n = sum(sizes)
    texts = rng.integers(0, 300, n)
    exact = np.array([int(t).to_bytes(2, "big") * 8 for t in texts], dtype="S16")
    band_keys = rng.integers(1, 40, (n, bands)).astype(np.uint64) + np.arange(bands, dtype=np.uint64) * 1000
    band_keys[texts % 7 == 0] = band_keys[np.argmax(texts % 7 == 0)]  # some near-duplicates share all bands
    band_keys[rng.random(n) < 0.05] = 0
    return exact, band_keys


def run_stages(tmp_path, exact: np.ndarray, band_keys: np.ndarray, sizes: list[int],
               config: DedupConfig) -> dict[int, tuple[int, str]]:
    layout = DedupLayout(tmp_path / "_work")
    offsets = np.cumsum([0, *sizes])
    for number, shard in enumerate(SHARDS):
        fingerprint = Fingerprinter(config)
        part = slice(offsets[number], offsets[number + 1])
        fingerprint.exact = list(exact[part]) if config.exact else []
        fingerprint.bands = list(band_keys[part])
        fingerprint.save(layout, shard)
    buckets = [(family, p) for family in families(config) for p in range(partitions(config, family))]
    for family, p in buckets:
        bucket_task(BucketJob(str(layout.work), family, p, partitions(config, family), SHARDS))
    result = cluster_task(ClusterJob(str(layout.work), SHARDS, buckets))
    found = {}
    for number, shard in enumerate(SHARDS):
        for row, reason, kept_shard, kept_row in json.loads(layout.drops(shard).read_text()):
            found[int(offsets[number] + row)] = (int(offsets[kept_shard] + kept_row), reason)
    assert sum(result["stats"]["dropped_by_reason"].values()) == len(found)
    return found


@pytest.mark.parametrize("exact_on, minhash_on", [(True, True), (True, False), (False, True)])
def test_disk_stages_match_find_duplicates(tmp_path, monkeypatch, exact_on, minhash_on):
    monkeypatch.setattr(dedup_stages, "WINDOW_ENTRIES", 64)  # blocks of 256 keys: many windows per band
    monkeypatch.setattr(dedup_stages, "PAIR_CHUNK", 100)  # many chunks per pair file
    config = DedupConfig(exact=exact_on, minhash=MinHashConfig(enabled=minhash_on, bands=6))
    sizes = [700, 0, 1300, 1, 900]  # an empty shard and a one-document shard too
    exact, band_keys = random_keys(np.random.default_rng(0), sizes, bands=6)
    got = run_stages(tmp_path, exact, band_keys, sizes, config)
    want = find_duplicates(exact if exact_on else None, band_keys if minhash_on else None)
    assert got == want
    assert len(want) > 1000  # the data really is full of duplicates
    reasons = {reason for _, reason in want.values()}
    assert reasons == ({"exact_duplicate", "near_duplicate"} if exact_on and minhash_on
                       else {"exact_duplicate" if exact_on else "near_duplicate"})


class ArrayRun:
    def __init__(self, keys: list[int], first_doc: int) -> None:
        self.keys = np.sort(np.array(keys, dtype=np.uint64))
        self.docs = np.arange(len(keys), dtype=np.uint64) + first_doc

    def __len__(self) -> int:
        return len(self.keys)

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[start:stop], self.docs[start:stop]


def test_merge_windows_carry_buckets_across():
    """One key spread over three runs and many windows still forms one bucket."""
    keys = [[5] * 600 + [9] * 10, [1, 5, 5, 7], [5] * 300]
    runs = [ArrayRun(run, 1000 * r) for r, run in enumerate(keys)]
    pairs = np.concatenate(list(equal_key_pairs(runs, window=10)))
    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        parent[find(a)] = find(b)
    fives = [int(d) for run in runs for k, d in zip(run.keys, run.docs) if k == 5]
    assert len({find(d) for d in fives}) == 1
    assert len(pairs) == (600 + 2 + 300 - 1) + 9  # every document but the first of its bucket, once
