"""HotpotQA answers with and without retrieval: three settings scored the same way, on SmolLM2 and an index
over the sampled questions' own paragraphs (the full 66K-paragraph pool is the benchmark's)."""

from __future__ import annotations

import pytest

from lmforge.eval.qa import prediction_from_reply, qa_path, read_hotpotqa, score_item
from lmforge.eval.tasks import sample_items
from lmforge.rag.answer import AnswerConfig, without_citations
from lmforge.rag.answer_quality import SETTINGS, hotpotqa_answer_quality


def test_three_settings_on_the_same_questions_scored_as_lmforge_eval_scores(tmp_path, minilm, smollm2):
    from lmforge.infer.engine import Engine
    from lmforge.rag.embed import load_embedder
    from lmforge.rag.index import RagIndex, update_index
    from lmforge.rag.retrieve import Retriever
    from lmforge.rag.tasks import TASK_CHUNKING, hotpotqa_task

    limit, seed = 1, 3
    chosen = sample_items(read_hotpotqa(qa_path("hotpotqa", quiet=True)), limit, seed)
    task = hotpotqa_task(qa_path("hotpotqa", quiet=True))
    titles = {line.split(":", 1)[0] for item in chosen for line in item.context.split("\n\n")}
    documents = [doc for doc in task.documents if doc.source in titles]  # the gold paragraphs and a few more
    embedder = load_embedder(minilm)
    update_index(tmp_path / "index", documents, embedder, chunking=TASK_CHUNKING)
    retriever = Retriever(RagIndex.open(tmp_path / "index"), embedder)
    engine = Engine(smollm2.model, smollm2.tokenizer, stop_ids=smollm2.stop_ids())

    result = hotpotqa_answer_quality(retriever, engine, limit=limit, seed=seed,
                                     config=AnswerConfig(k=2, max_tokens=8))
    assert result["questions"] == limit and [r["id"] for r in result["records"]] == [i.id for i in chosen]
    for setting in SETTINGS:
        f1s = [score_item(item.answers, prediction_from_reply(without_citations(r[setting]["reply"])),
                          hotpot=True)[1] for item, r in zip(chosen, result["records"])]
        assert result[setting]["f1"] == pytest.approx(sum(f1s) / limit)
        assert 0.0 <= result[setting]["exact_match"] <= result[setting]["f1"] <= 1.0
    for record in result["records"]:  # what was retrieved came from the index, gold paragraphs included
        assert set(record["sources"]) <= {doc.key for doc in documents}
