"""The retrieval benchmarks as shipped: HotpotQA's pooled corpus and doc2dial with its Dragon baseline."""

from __future__ import annotations

import pytest

from lmforge.hub import SampleError
from lmforge.rag.metrics import evaluate
from lmforge.rag.tasks import conversation_query, load_task


def task(name: str):
    try:
        return load_task(name, quiet=True)
    except SampleError as err:
        pytest.skip(f"{name} sample unavailable: {err}")


def test_doc2dial_and_the_shipped_dragon_run():
    doc2dial = task("doc2dial")
    assert len(doc2dial.queries) == 3939 and len(doc2dial.documents) == 1239
    sites = {d.key.split("#")[0] for d in doc2dial.documents}
    assert sites == {"ssa", "va", "dmv", "studentaid"}
    for query in doc2dial.queries:
        assert len(query.relevant) == 1 and query.relevant[0] in query.within  # gold among its site's chunks
    rankings = [doc2dial.baseline[q.id] for q in doc2dial.queries]
    scores = evaluate(rankings, [q.relevant for q in doc2dial.queries], recall_ks=(1, 5))
    assert round(scores["recall@1"], 3) == 0.493 and round(scores["recall@5"], 3) == 0.836


def test_conversation_becomes_latest_turn_first():
    messages = [{"role": "user", "content": "I lost my card."},
                {"role": "assistant", "content": "Which one?"},
                {"role": "user", "content": " The Medicare card. "}]
    query = conversation_query(messages)
    assert query == "user: The Medicare card.\nagent: Which one?\nuser: I lost my card."


def test_hotpotqa_pooled_corpus():
    hotpot = task("hotpotqa")
    assert len(hotpot.queries) == 7405
    assert len(hotpot.documents) == 66581  # 66,635 texts, 54 of them a whitespace variant of another
    keys = {d.key for d in hotpot.documents}
    assert len(keys) == len(hotpot.documents)
    assert all(len(q.relevant) == 2 and set(q.relevant) <= keys for q in hotpot.queries)
    first = hotpot.queries[0]
    assert first.text == "Were Scott Derrickson and Ed Wood of the same nationality?"
    assert set(first.relevant) == {"Scott Derrickson", "Ed Wood"}
