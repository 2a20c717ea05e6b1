"""Exact and near-duplicate detection: content hashes and MinHash with LSH banding.

The web repeats itself: mirrors, syndicated articles, the same page under two URLs,
documentation in HTML and in its source format. Training on repeats wastes compute and
makes models memorise, so duplicates are removed across the *whole run*, not only
within one shard (two copies of a page rarely land in the same shard).

**Exact**: a 128-bit BLAKE2b of the text. Equal hashes = identical text.

**Near (MinHash, Broder 1997)**: the text is normalised (lower case, punctuation
removed, digits folded to ``0``) and cut into overlapping word 5-grams ("shingles").
Two documents' similarity is the Jaccard index of their shingle sets,
``|A ∩ B| / |A ∪ B|``. MinHash estimates it cheaply: hash every shingle with a random
permutation and keep the smallest value; two documents share that minimum with
probability exactly equal to their Jaccard similarity. 112 permutations give a
112-number *signature* per document.

**LSH banding** finds pairs with similar signatures without comparing all pairs: the
112 numbers are cut into 14 bands of 8 rows; two documents become a candidate pair if
any band is identical in both. For similarity ``s`` that happens with probability
``1 - (1 - s^8)^14``: 5% at s=0.5, 21% at 0.6, 57% at 0.7, 77% at 0.75, 92% at 0.8,
99% at 0.85. These are FineWeb's numbers; the curve's midpoint, ``(1/14)^(1/8)``, is
0.72.

Candidate pairs are merged into clusters with union-find; each cluster keeps its first
document in input order (shard, then position), so the result does not depend on how
many workers ran or in which order they finished.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

_PUNCT = re.compile(r"[^\w\s]+")
_DIGITS = re.compile(r"\d+")
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for polynomial hashing
_MIX = np.uint64(0xBF58476D1CE4E5B9)


@dataclass
class MinHashConfig:
    enabled: bool = True
    ngram: int = 5
    bands: int = 14
    rows: int = 8  # bands * rows = 112 hash functions
    seed: int = 1


@dataclass
class DedupConfig:
    exact: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)


def exact_key(text: str) -> bytes:
    """16-byte content hash of the text as written."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, runs of digits to ``0``: what near-duplicates share."""
    return _DIGITS.sub("0", _PUNCT.sub(" ", text.lower()))


def _mix(values: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64-style) so that similar inputs give unrelated outputs."""
    values = values ^ (values >> np.uint64(31))
    values = values * _MIX
    return values ^ (values >> np.uint64(29))


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """64-bit hashes of the text's word n-grams (one n-gram of all words if there are fewer;
    repeats included: they cannot change a minimum).

    Each word is hashed once (CRC-32), then each window of n word hashes is combined as a
    polynomial, vectorised over the whole document.
    """
    words = normalize(text).split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        word_hashes = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words),
                                  dtype=np.uint64, count=len(words)) + np.uint64(1)
        width = min(n, len(words))
        count = len(words) - width + 1
        combined = np.zeros(count, dtype=np.uint64)
        for k in range(width):
            combined = combined * _MUL + word_hashes[k:k + count]
        return _mix(combined)


class MinHasher:
    """Signatures of `bands * rows` values from multiply-shift hashes ``(a*x + b) >> 32``.

    ``a`` (odd) and ``b`` are random 64-bit numbers and the arithmetic wraps at 2**64:
    Dietzfelbinger's multiply-shift family, a universal family whose top 32 bits behave
    as a random permutation of the shingle hashes for MinHash's purposes, and costs
    one multiply, one add and one shift per value (no modulo).
    """

    def __init__(self, config: MinHashConfig | None = None) -> None:
        self.config = config or MinHashConfig()
        count = self.config.bands * self.config.rows
        rng = np.random.default_rng(self.config.seed)
        self._a = rng.integers(0, 2**64 - 1, size=count, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self._b = rng.integers(0, 2**64 - 1, size=count, dtype=np.uint64, endpoint=True)

    @property
    def num_hashes(self) -> int:
        return len(self._a)

    def signature(self, text: str) -> np.ndarray | None:
        """The document's MinHash signature (uint32), or None for a text without words."""
        shingles = shingle_hashes(text, self.config.ngram)
        if len(shingles) == 0:
            return None
        result = np.full(self.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), 4096):  # bounded memory for very long documents
                block = shingles[start:start + 4096, None] * self._a + self._b
                np.minimum(result, (block >> np.uint64(32)).min(axis=0), out=result)
        return result.astype(np.uint32)

    def band_keys(self, signature: np.ndarray | None) -> np.ndarray:
        """One 64-bit key per band; all zeros (never matched) for a document without signature."""
        bands, rows = self.config.bands, self.config.rows
        if signature is None:
            return np.zeros(bands, dtype=np.uint64)
        grid = signature.astype(np.uint64).reshape(bands, rows)
        key = np.arange(1, bands + 1, dtype=np.uint64)  # band number in the key: bands never collide
        with np.errstate(over="ignore"):
            for r in range(rows):
                key = key * _MUL + grid[:, r]
            key = _mix(key)
        key[key == 0] = 1  # 0 is reserved for "no signature"
        return key


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and explanations)."""
    sa, sb = set(shingle_hashes(a, n).tolist()), set(shingle_hashes(b, n).tolist())
    return len(sa & sb) / max(1, len(sa | sb))


class _UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the smallest member (the one kept)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = int(parent[root])
        while parent[i] != root:  # path compression
            parent[i], i = root, int(parent[i])
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def _first_of_group(keys: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row with the same key (itself if it is first)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new_group = np.ones(len(keys), dtype=bool)
    new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = order[new_group]
    group_index = np.cumsum(new_group) - 1
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = group_first[group_index]
    return first


def find_duplicates(exact_keys: np.ndarray | None,
                    band_keys: np.ndarray | None) -> dict[int, tuple[int, str]]:
    """Duplicates among n documents in input order: ``{index: (index_kept, reason)}``.

    `exact_keys` is an (n,) array of 16-byte keys (or None to skip exact dedup);
    `band_keys` an (n, bands) uint64 array (or None to skip MinHash). The reason is
    ``exact_duplicate`` when the text equals the kept one's, else ``near_duplicate``.
    """
    n = len(exact_keys) if exact_keys is not None else (len(band_keys) if band_keys is not None else 0)
    if n == 0:
        return {}
    sets = _UnionFind(n)
    columns: list[np.ndarray] = []
    if exact_keys is not None:
        columns.append(exact_keys)
    if band_keys is not None:
        columns.extend(band_keys[:, b] for b in range(band_keys.shape[1]))
    for column in columns:
        first = _first_of_group(column)
        for i in np.nonzero(first != np.arange(n))[0]:
            if column.dtype == np.uint64 and column[i] == 0:
                continue  # document without a signature
            sets.union(int(i), int(first[i]))
    duplicates: dict[int, tuple[int, str]] = {}
    for i in range(n):
        root = sets.find(i)
        if root != i:
            same = exact_keys is not None and exact_keys[i] == exact_keys[root]
            duplicates[i] = (root, "exact_duplicate" if same else "near_duplicate")
    return duplicates
