"""Answering from retrieved passages: the prompt's room, the relevance guard, citations, and SmolLM2 really
answering from a passage it could not have known."""

from __future__ import annotations

import json

import pytest

from lmforge.rag.answer import (
    DONT_KNOW,
    SYSTEM,
    AnswerConfig,
    answer,
    answer_many,
    build_messages,
    cited_numbers,
    relevant_hits,
    without_citations,
)
from lmforge.rag.chunk import Chunk
from lmforge.rag.retrieve import Hit


@pytest.fixture(scope="module")
def engine(smollm2):
    from lmforge.infer.engine import Engine

    return Engine(smollm2.model, smollm2.tokenizer, stop_ids=smollm2.stop_ids())


def _hit(text: str, n: int = 0) -> Hit:
    return Hit(Chunk(text, f"doc{n}.md", f"doc{n}", 0, 0, len(text), ("Heading",)), 1.0, n + 1, n)


@pytest.mark.parametrize(("reply", "cited"), [
    ("Quillport [1].", [1]),
    ("Both say so [2, 1], and [1][3] agree.", [2, 1, 3]),
    ("No source: [7] and [0] name none.", []),
    ("Array syntax a[1] is a citation too, a known limit.", [1]),
])
def test_citations_are_read_back_once_each_and_only_for_real_sources(reply, cited):
    assert cited_numbers(reply, n_sources=3) == cited


def test_without_citations_leaves_the_answer():
    assert without_citations("Quillport [1], the harbour town [2, 3].") == "Quillport, the harbour town."


def test_sources_fill_the_room_best_first_and_the_last_is_cut_not_silently_dropped(smollm2):
    tokenizer = smollm2.tokenizer
    hits = [_hit(f"Passage {n}: " + "words about packages " * 40, n) for n in range(4)]
    context, max_tokens = 700, 200
    messages, fitted = build_messages("How?", hits, tokenizer, context=context, max_tokens=max_tokens)
    prompt = tokenizer.encode_chat_prompt(messages)
    assert len(prompt) <= context - max_tokens
    assert 1 <= fitted < 4
    user = messages[-1]["content"]
    assert messages[0] == {"role": "system", "content": SYSTEM}
    assert user.endswith("Question: How?") and f"[{fitted}] (doc{fitted - 1}.md > Heading)" in user
    assert user.count("…") <= 1 and f"[{fitted + 1}]" not in user
    with pytest.raises(ValueError, match="no room"):
        build_messages("How? " * 300, hits, tokenizer, context=context, max_tokens=max_tokens)


def test_the_relevance_guard_drops_unrelated_passages(rag_retriever):
    hits = rag_retriever.search("What is the capital of Zorbania?", k=3)
    kept, relevance = relevant_hits("What is the capital of Zorbania?", hits, rag_retriever, 0.25)
    assert kept and all("Zorbania" in h.chunk.text for h in kept) and min(relevance) >= 0.25
    hits = rag_retriever.search("Who painted the Mona Lisa?", k=3)
    assert relevant_hits("Who painted the Mona Lisa?", hits, rag_retriever, 0.25) == ([], [])


@pytest.mark.parametrize("mode", ["dense", "hybrid", "bm25"])
def test_relevance_is_the_cosine_an_encoder_pass_gives_without_embedding_any_passage(rag_retriever, mode,
                                                                                      monkeypatch):
    question = "What is the capital of Zorbania?"
    hits = rag_retriever.search(question, k=4, mode=mode)
    embedder = rag_retriever.embedder
    fresh = embedder.encode([question, *(h.chunk.indexed_text for h in hits)])
    expected = fresh[1:] @ fresh[0]
    encoded: list[list[str]] = []
    real_encode = embedder.encode

    def counting_encode(texts, **options):
        encoded.append(list(texts))
        return real_encode(texts, **options)

    monkeypatch.setattr(embedder, "encode", counting_encode)
    got = rag_retriever.relevance([question], [hits])[0]
    assert got == pytest.approx(list(expected), abs=1e-5)
    if mode != "bm25":
        assert encoded == []  # the search embedded the question; the passages' vectors are stored
    else:
        assert encoded in ([], [[question]])  # at most the question (BM25 needed no vector)


def test_smollm2_answers_from_the_passage_and_abstains_without_one(rag_retriever, engine):
    config = AnswerConfig(max_tokens=12)
    questions = ["What is the capital of Zorbania?", "Who painted the Mona Lisa?"]
    found, unknown = answer_many(questions, rag_retriever, engine, config)
    assert "Quillport" in found.text  # a made-up fact: only the retrieved passage holds it
    assert found.sources[0].chunk.source.endswith("zorbania.md") and not found.abstained
    assert unknown.text == DONT_KNOW and unknown.abstained and unknown.sources == []
    as_json = found.to_json()
    assert as_json["answer"] == found.text and as_json["sources"][0]["number"] == 1
    with pytest.raises(ValueError, match="empty"):
        answer("  ", rag_retriever, engine, config)
    with pytest.raises(ValueError, match="k must be"):
        AnswerConfig(k=0)


def test_rag_ask_prints_the_answer_and_its_sources_or_json(rag_retriever, smollm2_gguf, capsys, tmp_path):
    from lmforge.cli import main

    index = str(rag_retriever.index.path)
    ask = ["rag", "ask", "--index", index, "--model", str(smollm2_gguf), "--max-tokens", "12"]
    assert main([*ask, "What is the capital of Zorbania?", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert "Quillport" in reply["answer"]
    assert reply["sources"][0]["source"].endswith("zorbania.md") and reply["sources"][0]["score"] > 0
    assert main([*ask, "Who painted the Mona Lisa?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(DONT_KNOW) and "relevant enough" in out
    nowhere = ["rag", "ask", "--index", index, "--model", str(tmp_path / "no-model")]
    assert main([*nowhere, "Who painted the Mona Lisa?"]) == 0  # abstaining needs no model: none is loaded
    assert capsys.readouterr().out.startswith(DONT_KNOW)
    assert main(["rag", "ask", "--index", str(tmp_path / "nothing"), "--model", "smollm2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err and err.count("\n") == 1
