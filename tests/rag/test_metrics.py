"""Retrieval metrics: a hand computation from the definitions, then trec_eval (pytrec_eval) on random runs."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.rag.metrics import evaluate, ndcg_at, recall_at, reciprocal_rank


def test_one_query_by_hand():
    ranking = ["d3", "d1", "d7", "d2", "d9"]
    relevant = {"d1", "d2"}
    assert recall_at(ranking, relevant, 1) == 0.0
    assert recall_at(ranking, relevant, 2) == 0.5
    assert recall_at(ranking, relevant, 5) == 1.0
    assert reciprocal_rank(ranking, relevant) == 0.5
    # DCG = 1/log2(3) + 1/log2(5); ideal = 1/log2(2) + 1/log2(3)
    dcg, ideal = 1 / math.log2(3) + 1 / math.log2(5), 1 + 1 / math.log2(3)
    assert ndcg_at(ranking, relevant, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at(ranking, relevant, 10) == pytest.approx(0.6509209298)


def test_nothing_found_scores_zero_and_no_gold_is_an_error():
    assert reciprocal_rank(["a", "b"], {"z"}) == 0.0 and ndcg_at(["a"], {"z"}) == 0.0
    with pytest.raises(ValueError, match="without relevant"):
        recall_at(["a"], set(), 5)


def test_means_over_queries():
    scores = evaluate([["a", "b"], ["c", "d"]], [{"b"}, {"x"}], recall_ks=(1, 2))
    assert scores == {"recall@1": 0.0, "recall@2": 0.5, "mrr": 0.25,
                      "ndcg@10": pytest.approx(0.5 * (1 / math.log2(3)))}


def test_agrees_with_trec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="pip install pytrec-eval-terrier (dev extra)")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(40)]
    qrels, run, rankings, relevant = {}, {}, [], []
    for q in range(60):
        gold = set(rng.sample(docs, rng.choice([1, 2, 3])))
        ranking = rng.sample(docs, rng.choice([5, 12, 30]))
        qrels[f"q{q}"] = {d: 1 for d in gold}
        run[f"q{q}"] = {d: float(len(ranking) - i) for i, d in enumerate(ranking)}  # distinct scores
        rankings.append(ranking)
        relevant.append(gold)
    measures = {"recall.1,2,5,10,20", "recip_rank", "ndcg_cut.10"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours = evaluate(rankings, relevant)
    for key, theirs in [("recall@1", "recall_1"), ("recall@2", "recall_2"), ("recall@5", "recall_5"),
                        ("recall@10", "recall_10"), ("recall@20", "recall_20"), ("mrr", "recip_rank"),
                        ("ndcg@10", "ndcg_cut_10")]:
        mean = sum(v[theirs] for v in per_query.values()) / len(per_query)
        assert ours[key] == pytest.approx(mean, abs=1e-12), key
