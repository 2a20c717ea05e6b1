"""Exact and MinHash near-duplicate detection, across shards, on Python's HTML/reST twins."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.data.dedup import MinHashConfig, MinHasher, exact_key, find_duplicates, jaccard
from lmforge.data.pipeline import RunFolder, prepare
from lmforge.data.writers import read_documents

from .conftest import copy_into, only

TWIN_PAGES = ["tutorial/appetite", "tutorial/interpreter", "tutorial/introduction", "tutorial/controlflow",
              "tutorial/classes", "tutorial/errors", "tutorial/inputoutput", "tutorial/interactive",
              "tutorial/floatingpoint", "tutorial/modules", "howto/cporting", "howto/curses"]


def words(n: int, seed: int) -> list[str]:
    """n random words from a 17,576-word vocabulary (letters only: normalisation folds digits)."""
    rng = np.random.default_rng(seed)
    letters = rng.integers(0, 26, (n, 3))
    return ["".join(chr(97 + c) for c in row) for row in letters]


def test_minhash_estimates_jaccard():
    hasher = MinHasher()
    assert hasher.num_hashes == 112
    base = words(600, 0)
    for keep in (1.0, 0.9, 0.7, 0.4):
        other = base[: int(600 * keep)] + words(600 - int(600 * keep), 1)
        a, b = " ".join(base), " ".join(other)
        estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
        assert estimate == pytest.approx(jaccard(a, b), abs=0.12)


def test_lsh_band_probability_matches_the_formula():
    """With 14 bands of 8 rows, pairs at Jaccard s collide in some band with 1-(1-s^8)^14."""
    hasher = MinHasher(MinHashConfig(bands=14, rows=8))
    hits = {0.9: 0, 0.5: 0}
    trials = 60
    for seed in range(trials):
        base = words(400, 10 + seed)
        for s in hits:
            # share m of the 400 5-gram positions: Jaccard of the shingle sets is about s
            changed = int(round(400 * (1 - s) / (1 + s)))
            other = base[: 400 - changed] + words(changed, 1000 + seed)
            hits[s] += bool(np.any(hasher.band_keys(hasher.signature(" ".join(base)))
                                   == hasher.band_keys(hasher.signature(" ".join(other)))))
    assert hits[0.9] / trials > 0.85  # formula: 0.99
    assert hits[0.5] / trials < 0.1  # formula: 0.05


def test_find_duplicates_keeps_the_first_of_each_cluster():
    texts = ["alpha beta gamma delta epsilon zeta eta theta"] * 2 + ["something else entirely here today"]
    exact = np.array([exact_key(t) for t in texts], dtype="S16")
    hasher = MinHasher()
    bands = np.stack([hasher.band_keys(hasher.signature(t)) for t in texts])
    assert find_duplicates(exact, bands) == {1: (0, "exact_duplicate")}
    near = texts[:1] + [texts[0] + " iota"]
    bands = np.stack([hasher.band_keys(hasher.signature(t)) for t in near])
    exact = np.array([exact_key(t) for t in near], dtype="S16")
    assert find_duplicates(exact, bands) == {1: (0, "near_duplicate")}
    assert find_duplicates(None, np.zeros((3, 14), dtype=np.uint64)) == {}  # no signature: never a match


def test_html_and_rst_twins_are_caught_across_shards(python_docs, tmp_path):
    """Each Python docs page exists as HTML and as its reST source; the pair must be
    found although the twins land in different shards, and no two different pages
    may be taken for each other."""
    pairs = []
    for page in TWIN_PAGES:
        pairs.append((python_docs / f"{page}.html", f"a-html/{page}.html"))
        pairs.append((python_docs / "_sources" / f"{page}.rst.txt", f"b-rst/{page}.rst.txt"))
    corpus = copy_into(tmp_path / "in", pairs)
    out = tmp_path / "out"
    report = prepare([corpus], out, only("extract", "dedup", shards=4, keep_intermediate=True))
    folder = RunFolder(out)
    from lmforge.data.pipeline import discover_inputs, plan_shards

    plan = plan_shards(discover_inputs([corpus]), 4)
    ids = {s.index: [d.id for d in read_documents(folder.filtered(s))] for s in plan}
    matches = []
    for shard in plan:
        for row, reason, kept_shard, kept_row in json.loads(folder.drops(shard).read_text()):
            assert kept_shard < shard.index  # the twins were in different shards
            matches.append((ids[shard.index][row], ids[kept_shard][kept_row], reason))
    stem = lambda doc_id: doc_id.split("/", 2)[2].split(".")[0]  # noqa: E731
    assert all(stem(dup) == stem(kept) for dup, kept, _ in matches), matches  # no false positives
    assert len(matches) >= 0.75 * len(TWIN_PAGES), matches
    assert all(reason == "near_duplicate" for *_, reason in matches)
    written = [d.id for p in sorted(out.glob("part-*.parquet")) for d in read_documents(p)]
    assert len(written) == len(set(written)) == 2 * len(TWIN_PAGES) - len(matches)
    assert report.docs_written == len(written)
