"""/v1/embeddings through the openai client, and chat requests that retrieve (`retrieval`), on a live server
with the real all-MiniLM-L6-v2 and a real index."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from lmforge.rag.answer import DONT_KNOW
from lmforge.serve.app import create_app


@pytest.fixture(scope="module")
def app(engine_factory, minilm_embedder, rag_retriever):
    return create_app({"tiny": engine_factory(seed=0, max_seq_len=1024)},
                      embedders={"minilm": minilm_embedder}, retrievers={"handbook": rag_retriever})


def test_openai_client_embeddings_equal_the_embedders(serve, app, minilm_embedder):
    from openai import OpenAI

    texts = ["How do I install a package?", "cron runs commands at fixed times.", "naïve café 東京"]
    with serve(app) as (url, _server):
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        as_base64 = client.embeddings.create(model="minilm", input=texts)  # the client's default format
        as_floats = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
        models = [m.id for m in client.models.list().data]
        question = [{"role": "user", "content": "How do I install a package with apt-get?"}]
        reply = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=question,
                                               extra_body={"retrieval": {"index": "handbook", "k": 2}})
    assert reply.model_extra["sources"][0]["source"].endswith("apt.md")  # as docs/serving.md reads them
    expected = minilm_embedder.encode(texts)
    got = np.array([d.embedding for d in sorted(as_base64.data, key=lambda d: d.index)], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(as_floats.data[0].embedding, expected[0], atol=1e-6)
    assert as_base64.model == "minilm" and as_base64.usage.prompt_tokens == sum(
        len(ids) for ids in minilm_embedder.token_ids(texts))
    assert set(models) == {"tiny", "minilm"}


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/embeddings", {"model": "minilm", "input": [1, 2, 3]}, 400, "send text"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 128}, 400, "384-dimensional"),
    ("/v1/embeddings", {"model": "tiny", "input": "x"}, 404, "not an embedding model"),
    ("/v1/chat/completions", {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "is an embedding model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "retrieval": {"index": "nosuch"}}, 404, "no index named 'nosuch'"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}],
                              "retrieval": {"index": "handbook"}}, 400, "last message must be the user's"),
])
def test_bad_requests_are_openai_errors_naming_the_problem(serve, app, path, body, status, message):
    with serve(app) as (url, _server):
        response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_a_retrieving_chat_gets_its_numbered_sources_and_the_prompt_holds_them(serve, app, engine_factory):
    question = "How do I install a Debian package?"
    body = {"model": "tiny", "messages": [{"role": "system", "content": "ignored"},
                                          {"role": "user", "content": question}],
            "retrieval": {"index": "handbook", "k": 2}, "max_tokens": 8, "temperature": 0}
    with serve(app) as (url, _server):
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True},
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    sources = reply["sources"]
    assert sources[0]["source"].endswith("apt.md") and sources[0]["number"] == 1
    assert all(s["relevance"] >= 0.25 for s in sources)  # the guard: cron's passage may or may not pass
    assert chunks[0]["sources"] == sources  # streamed: on the first chunk
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == reply["choices"][0]["message"]["content"]  # greedy: the same reply either way
    # the model was given the passages: the prompt is lmforge.rag.answer's, as `rag ask` builds it
    assert reply["usage"]["prompt_tokens"] > len(engine_factory(seed=0).tokenizer.encode(sources[0]["text"]))


def test_nothing_relevant_retrieved_is_i_dont_know_without_asking_the_model(serve, app):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Who painted the Mona Lisa?"}],
            "retrieval": {"index": "handbook"}}
    with serve(app) as (url, _server):
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True},
                          timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert reply["choices"][0]["message"]["content"] == DONT_KNOW and reply["sources"] == []
    assert reply["usage"]["completion_tokens"] == 0
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == DONT_KNOW
    assert lines[-1] == "data: [DONE]"


def test_an_index_uses_the_served_embedding_model_instead_of_loading_it_again(rag_retriever, minilm_embedder,
                                                                              monkeypatch):
    import lmforge.rag.embed
    from lmforge.serve.cli import _load_retrievers

    def no_second_load(*args, **kwargs):
        raise AssertionError("the embedder was loaded a second time")

    monkeypatch.setattr(lmforge.rag.embed, "load_embedder", no_second_load)
    retrievers = _load_retrievers([("pages", str(rag_retriever.index.path))], {"minilm": minilm_embedder})
    assert retrievers["pages"].embedder is minilm_embedder
