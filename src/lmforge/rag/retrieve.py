"""Search an index: dense (the embedder's vectors), sparse (BM25), or both fused by rank.

Dense retrieval matches meaning ("car" finds "automobile") but can miss a rare name or
number it never learned to weigh; BM25 matches the query's exact words, rare ones
weighted most, and knows nothing of synonyms. Their errors differ, which is why fusing
them helps.

**Reciprocal rank fusion** (Cormack, Clarke & Büttcher, 2009) ignores the two scores,
which live on unrelated scales (cosine in [-1, 1], BM25 unbounded), and adds the
reciprocal ranks instead: a chunk at rank r in a list earns 1 / (k + r), summed over the
lists it appears in (its top `depth` candidates each). k = 60 (the paper's) damps the
difference between the very first ranks, so a chunk ranked well by both beats one
ranked first by only one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lmforge.rag.chunk import Chunk
from lmforge.rag.index import RagIndex, RagIndexError

if TYPE_CHECKING:
    from lmforge.rag.embed import Embedder

MODES = ("dense", "bm25", "hybrid")
RRF_K = 60
FUSION_DEPTH = 100
RECENT_QUERIES = 4096


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # cosine (dense), BM25 score (bm25), or fused reciprocal ranks (hybrid)
    rank: int  # 1 = best
    row: int  # the chunk's row in the index


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Items of several best-first rankings, ordered by sum of 1 / (k + rank); ties keep first-seen order."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda pair: -pair[1])


class Retriever:
    """An index and the embedder that built it; `search` one query, `search_many` a batch."""

    def __init__(self, index: RagIndex, embedder: Embedder | None = None, *, rrf_k: int = RRF_K,
                 depth: int = FUSION_DEPTH, ef_search: int | None = None, nprobe: int | None = None) -> None:
        if embedder is not None:
            index.check_embedder(embedder.name)
        self.index, self.embedder, self.rrf_k, self.depth = index, embedder, rrf_k, depth
        self.ef_search, self.nprobe = ef_search, nprobe
        self._recent: dict[str, np.ndarray] = {}  # the last queries' vectors, oldest first

    def search(self, query: str, k: int = 5, mode: str = "hybrid", *,
               within: Sequence[str] | None = None) -> list[Hit]:
        """The k best chunks for `query` (only from documents `within`, when given)."""
        return self.search_many([query], k, mode, within=[within] if within is not None else None)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, mode: str = "hybrid", *,
                    within: Sequence[Sequence[str]] | None = None, progress: bool = False) -> list[list[Hit]]:
        """`search` for each query; `within[i]` (document keys) restricts query i's candidates."""
        if mode not in MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; choose from {', '.join(MODES)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if within is not None and len(within) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(within)} restrictions")
        if mode != "bm25" and self.index.dense is None:
            raise RagIndexError(f"{self.index.path} has no dense vectors (built with --embedder none): "
                                f"use --mode bm25")
        if mode != "bm25" and self.embedder is None:
            raise ValueError(f"--mode {mode} needs the index's embedder ({self.index.embedder_name})")
        depth = k if mode != "hybrid" else max(k, self.depth)
        results: list[list[Hit]] = [[] for _ in queries]
        for restriction, members in _groups(queries, within).items():
            rows = self.index.rows_of_documents(restriction) if restriction is not None else None
            batch = [queries[i] for i in members]
            dense = self._dense(batch, depth, rows, progress) if mode != "bm25" else None
            sparse = self.index.bm25_search(batch, depth, rows=rows) if mode != "dense" else None
            for n, i in enumerate(members):
                if mode == "dense":
                    ranked = dense[n]
                elif mode == "bm25":
                    ranked = sparse[n]
                else:
                    ranked = reciprocal_rank_fusion([[r for r, _ in dense[n]], [r for r, _ in sparse[n]]],
                                                    self.rrf_k)
                results[i] = [Hit(self.index.chunks[row], score, rank, row)
                              for rank, (row, score) in enumerate(ranked[:k], start=1)]
        return results

    def relevance(self, queries: Sequence[str], hits: Sequence[Sequence[Hit]]) -> list[list[float]]:
        """Cosine similarity of each hit to its query, whatever the mode that found it (a fused or
        BM25 score says nothing about how related a passage is). From the query vectors the search
        just made and the vectors stored in the index, so no passage is embedded again."""
        if self.embedder is None:
            raise ValueError(f"relevance needs the index's embedder ({self.index.embedder_name})")
        vectors = self._query_vectors(list(queries), progress=False)
        if self.index.dense is None:  # a BM25-only index searched with an embedder at hand
            return [[float(v) for v in self.embedder.encode([h.chunk.indexed_text for h in found]) @ q]
                    if found else [] for q, found in zip(vectors, hits)]
        return [[float(v) for v in self.index.stored_vectors([h.row for h in found]) @ q] if found else []
                for q, found in zip(vectors, hits)]

    def _dense(self, queries: list[str], k: int, rows: np.ndarray | None,
               progress: bool) -> list[list[tuple[int, float]]]:
        vectors = self._query_vectors(queries, progress)
        return self.index.dense_search(vectors, k, rows=rows, ef_search=self.ef_search, nprobe=self.nprobe)

    def _query_vectors(self, queries: list[str], progress: bool) -> np.ndarray:
        """The queries' vectors, embedding (in one batch) only those not among the recent ones: an
        evaluation's dense then hybrid pass, or a search and then its relevance guard, embed once."""
        missing = list(dict.fromkeys(q for q in queries if q not in self._recent))
        if missing:
            fresh = np.asarray(self.embedder.encode(missing, progress=progress), dtype=np.float32)
            for query, vector in zip(missing, fresh):
                self._recent[query] = vector
            while len(self._recent) > max(RECENT_QUERIES, len(queries)):
                del self._recent[next(iter(self._recent))]
        return np.stack([self._recent[q] for q in queries]) if queries else np.zeros((0, 0), np.float32)


def _groups(queries: Sequence[str],
            within: Sequence[Sequence[str]] | None) -> dict[tuple[str, ...] | None, list[int]]:
    """Query positions grouped by their restriction, so each group is one batched search."""
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for i in range(len(queries)):
        key = tuple(sorted(within[i])) if within is not None else None
        groups.setdefault(key, []).append(i)
    return groups
