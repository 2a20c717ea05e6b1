"""Retrieval metrics with binary relevance, as trec_eval computes them, averaged over queries.

For one query with relevant set R and a ranking d_1, d_2, ... (best first):

- recall@k = |{d_1..d_k} ∩ R| / |R|: the share of the gold passages that made the top k
  (with one gold passage, whether it did);
- reciprocal rank = 1 / (rank of the first relevant passage), 0 if none was retrieved;
  its mean over queries is MRR;
- nDCG@k = DCG@k / IDCG@k, with DCG@k = Σ_{i<=k, d_i ∈ R} 1 / log2(i + 1) (a relevant
  passage at rank 1 is worth 1, at rank 3 half) and IDCG@k the DCG of the ideal ranking,
  all of R first: Σ_{i<=min(k,|R|)} 1 / log2(i + 1).

A query with no relevant passage has no defined recall; it is an error here rather than
a silent 0 (trec_eval skips such queries).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

RECALL_AT = (1, 2, 5, 10, 20)


def recall_at(ranking: Sequence[str], relevant: Collection[str], k: int) -> float:
    _check(relevant)
    return len(set(ranking[:k]) & set(relevant)) / len(set(relevant))


def reciprocal_rank(ranking: Sequence[str], relevant: Collection[str]) -> float:
    _check(relevant)
    return next((1.0 / rank for rank, item in enumerate(ranking, start=1) if item in relevant), 0.0)


def ndcg_at(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    _check(relevant)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranking[:k], start=1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(set(relevant))) + 1))
    return dcg / ideal


def _check(relevant: Collection[str]) -> None:
    if not relevant:
        raise ValueError("a query without relevant passages cannot be scored")


def evaluate(rankings: Sequence[Sequence[str]], relevant: Sequence[Collection[str]],
             recall_ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Mean recall@k for each k, MRR and nDCG@10 over the queries (rankings[i] answers relevant[i])."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} queries")
    if not rankings:
        raise ValueError("no queries to score")
    n = len(rankings)
    scores = {f"recall@{k}": sum(recall_at(r, g, k) for r, g in zip(rankings, relevant)) / n
              for k in recall_ks}
    scores["mrr"] = sum(reciprocal_rank(r, g) for r, g in zip(rankings, relevant)) / n
    scores["ndcg@10"] = sum(ndcg_at(r, g, 10) for r, g in zip(rankings, relevant)) / n
    return scores
