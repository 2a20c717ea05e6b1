"""The API's answers, in-process (starlette's TestClient runs the app and its engine threads)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from lmforge.infer.sampling import SamplingParams
from lmforge.serve.app import create_app
from lmforge.serve.translate import chat_prompt_ids

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def app(engine_factory):
    return create_app({"tiny": engine_factory(max_batch_size=4)}, web_dir=None)


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


def sse(response) -> list:
    """The JSON events of a streamed response, and "[DONE]" as itself."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def engine_reply(engine, prompt_ids, **params) -> tuple[list[int], str]:
    """What the engine itself generates for a prompt: the reference for the server's answers."""
    events = list(engine.generate(prompt_ids, SamplingParams(**params)))
    return [e.token_id for e in events], "".join(e.text for e in events)


def test_models_lists_every_model_with_its_context(engine_factory):
    engines = {"a": engine_factory(max_seq_len=64), "b": engine_factory(seed=1, max_seq_len=96)}
    app = create_app(engines, web_dir=None)
    with TestClient(app) as client:
        body = client.get("/v1/models").json()
        assert body["object"] == "list"
        assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [("a", "model", 64),
                                                                                  ("b", "model", 96)]
        assert client.get("/v1/models/b").json()["max_model_len"] == 96
        assert client.get("/v1/models/c").status_code == 404
        assert client.get("/health").json() == {"status": "ok", "models": ["a", "b"]}


def test_several_models_are_chosen_by_name(engine_factory, tokenizer):
    a, b = engine_factory(seed=1), engine_factory(seed=2)
    prompt = chat_prompt_ids(tokenizer, _messages(HELLO))
    expected = {name: engine_reply(e, prompt, temperature=0, max_tokens=6, ignore_eos=True)[1]
                for name, e in (("a", a), ("b", b))}
    assert expected["a"] != expected["b"]  # two different random models
    with TestClient(create_app({"a": a, "b": b}, web_dir=None)) as client:
        for name in ("a", "b", "a"):
            body = client.post("/v1/chat/completions", json={
                "model": name, "messages": HELLO, "temperature": 0, "max_tokens": 6,
                "ignore_eos": True}).json()
            assert body["model"] == name and body["choices"][0]["message"]["content"] == expected[name]
        missing = client.post("/v1/chat/completions", json={"messages": HELLO})  # two models: which one?
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def _messages(raw):
    from lmforge.serve.schemas import ChatMessage

    return [ChatMessage(**m) for m in raw]


def test_chat_greedy_reply_is_the_engines_own(app, client, tokenizer):
    engine = app.state.catalog.get("tiny").engine
    prompt = chat_prompt_ids(tokenizer, _messages(HELLO))
    ids, text = engine_reply(engine, prompt, temperature=0, max_tokens=12, ignore_eos=True)
    body = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 12, "ignore_eos": True}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                             "total_tokens": len(prompt) + 12}


def test_chat_streaming_matches_the_whole_reply_and_reports_usage(client):
    request = {"messages": HELLO, "temperature": 0, "max_tokens": 10, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=request).json()
    streamed = request | {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=streamed) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_logprobs_have_openais_shape_and_the_models_values(app, client, tokenizer):
    engine = app.state.catalog.get("tiny").engine
    prompt = chat_prompt_ids(tokenizer, _messages(HELLO))
    reference = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                            logprobs=True, top_logprobs=3)))
    body = client.post("/v1/chat/completions", json={
        "messages": HELLO, "temperature": 0, "max_tokens": 5, "ignore_eos": True,
        "logprobs": True, "top_logprobs": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry, event in zip(content, reference):
        token_bytes = tokenizer.token_bytes(event.token_id)
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(token_bytes)
        assert entry["token"] == token_bytes.decode("utf-8", errors="replace")
        assert entry["logprob"] == pytest.approx(event.logprob, abs=1e-5)
        assert [t["bytes"] for t in entry["top_logprobs"]] == [list(tokenizer.token_bytes(t.token_id))
                                                             for t in event.top_logprobs]
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6  # greedy picks the top token
    # streamed: the same entries, spread over the chunks
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": HELLO, "temperature": 0, "max_tokens": 5, "ignore_eos": True, "stream": True,
            "logprobs": True, "top_logprobs": 3}) as response:
        streamed = [e for c in sse(response)[:-1] for choice in c["choices"]
                    for e in (choice["logprobs"] or {}).get("content") or []]
    assert streamed == content


def test_completions_accept_text_ids_and_batches_with_legacy_logprobs(app, client, tokenizer):
    engine = app.state.catalog.get("tiny").engine
    ids = tokenizer.encode("The dog")
    _, expected = engine_reply(engine, ids, temperature=0, max_tokens=4, ignore_eos=True)
    greedy = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
    for prompt in ("The dog", ids):
        body = client.post("/v1/completions", json={"prompt": prompt} | greedy).json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
    batch = client.post("/v1/completions", json={"prompt": ["The dog", "Paris is"], "n": 2} | greedy).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert batch["choices"][0]["text"] == batch["choices"][1]["text"] == expected
    assert batch["usage"]["prompt_tokens"] == len(ids) + len(tokenizer.encode("Paris is"))
    assert batch["usage"]["completion_tokens"] == 16
    logprobs = client.post("/v1/completions", json={"prompt": "The dog", "logprobs": 2} | greedy).json()
    lp = logprobs["choices"][0]["logprobs"]
    assert [len(lp[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] == [4, 4, 4, 4]
    assert "".join(lp["tokens"]) == expected
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(4)]
    assert all(len(top) <= 2 and max(top.values()) >= lp["token_logprobs"][i] - 1e-6
               for i, top in enumerate(lp["top_logprobs"]))


def test_completions_default_to_16_tokens_and_stream(client):
    body = client.post("/v1/completions", json={"prompt": "The", "ignore_eos": True, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 16
    request = {"prompt": "The", "ignore_eos": True, "temperature": 0, "stream": True, "logprobs": 1}
    with client.stream("POST", "/v1/completions", json=request) as response:
        events = sse(response)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert text == body["choices"][0]["text"]
    offsets = [o for c in events[:-1] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and len(offsets) == 16


def test_seed_reproduces_and_n_gives_different_samples(client):
    request = {"messages": HELLO, "max_tokens": 8, "ignore_eos": True, "temperature": 1.0, "seed": 11, "n": 3}
    first = client.post("/v1/chat/completions", json=request).json()
    again = client.post("/v1/chat/completions", json=request).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1  # seed + i per choice
    assert first["usage"]["completion_tokens"] == 24
    assert first["usage"]["prompt_tokens"] == again["usage"]["prompt_tokens"] < 24  # once, not n times


def test_stop_strings_end_the_reply_before_them(client):
    free = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 30, "temperature": 0,
                                                "ignore_eos": True}).json()["choices"][0]["text"]
    stop = free[5:7]
    assert stop and stop not in free[:5]
    cut = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 30, "temperature": 0,
                                               "ignore_eos": True, "stop": [stop, "zzzz"]}).json()
    choice = cut["choices"][0]
    assert choice["text"] == free[:free.index(stop)] and choice["finish_reason"] == "stop"


def test_penalties_and_filters_reach_the_engine(client):
    base = {"messages": HELLO, "max_tokens": 20, "ignore_eos": True, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    penalized = client.post("/v1/chat/completions", json=base | {"frequency_penalty": 2.0,
                                                                 "presence_penalty": 2.0}).json()
    assert penalized["choices"][0]["message"]["content"] != plain
    short = base | {"max_tokens": 8}
    greedy = client.post("/v1/chat/completions", json=short).json()["choices"][0]["message"]["content"]
    for cut in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):  # each leaves only the top token
        samples = {client.post("/v1/chat/completions", json=short | cut | {"temperature": 1.5, "seed": s})
                   .json()["choices"][0]["message"]["content"] for s in (1, 2, 3)}
        assert samples == {greedy}, cut


def test_tokenize_and_detokenize_round_trip(client, tokenizer):
    body = client.post("/tokenize", json={"model": "tiny", "prompt": "Café 🙂 dog"}).json()
    assert body["tokens"] == tokenizer.encode("Café 🙂 dog")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 128
    joined = "".join(body["token_strs"])  # é and 🙂 are split across byte tokens: U+FFFD for their pieces
    assert joined.startswith("Caf") and joined.endswith(" dog") and "\ufffd" in joined
    assert all(s == tokenizer.token_bytes(t).decode("utf-8", "replace")
               for s, t in zip(body["token_strs"], body["tokens"]))
    assert client.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]}).json() == {
        "prompt": "Café 🙂 dog"}
    chat = client.post("/tokenize", json={"model": "tiny", "messages": HELLO,
                                          "add_generation_prompt": True}).json()
    assert chat["tokens"] == chat_prompt_ids(tokenizer, _messages(HELLO))
    assert chat["token_strs"][0] == "<|im_start|>" and "".join(chat["token_strs"]).endswith("assistant\n")
    without = client.post("/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    assert without["count"] < chat["count"]


def test_metrics_count_requests_tokens_and_latencies(client):
    client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5, "ignore_eos": True})
    client.post("/v1/chat/completions", json={"messages": []})
    text = client.get("/metrics").text
    assert 'lmforge_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'lmforge_http_requests_total{route="/v1/chat/completions",status="422"} 1.0' in text
    assert 'lmforge_generation_tokens_total{model="tiny"} 5.0' in text
    assert 'lmforge_request_finished_total{finish_reason="length",model="tiny"} 1.0' in text
    assert 'lmforge_time_to_first_token_seconds_count{model="tiny"} 1.0' in text
    assert 'lmforge_inter_token_latency_seconds_count{model="tiny"} 4.0' in text
    assert 'lmforge_requests_running{model="tiny"} 0.0' in text
    assert "_created" not in text


def test_playground_is_served_once_its_folder_exists(engine_factory, tmp_path):
    web = tmp_path / "web"
    with TestClient(create_app({"tiny": engine_factory()}, web_dir=web)) as client:
        missing = client.get("/")
        assert missing.status_code == 404 and "playground" in missing.json()["error"]["message"]
        assert client.get("/web/app.js").status_code == 404
        web.mkdir()
        (web / "index.html").write_text("<!doctype html><title>lmforge</title>")
        (web / "app.js").write_text("export {};")
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "lmforge" in page.text
        script = client.get("/web/app.js")
        assert script.status_code == 200 and script.text == "export {};"
        assert client.get("/web/../../etc/passwd").status_code == 404


def test_an_engine_failure_is_an_error_event_then_503(engine_factory):
    """A bug in the engine mid-reply: the stream ends with an OpenAI error event (its 200 was
    already sent), the next requests get 500/503 in OpenAI's shape, /health says 503."""
    engine = engine_factory()
    real_step, steps = engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    engine.step = failing_step
    with TestClient(create_app({"tiny": engine}, web_dir=None)) as client:
        request = {"messages": HELLO, "max_tokens": 20, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            events = sse(response)
        assert "[DONE]" not in events
        error = events[-1]["error"]
        assert error["type"] == "server_error" and "simulated kernel failure" in error["message"]
        later = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert later.status_code == 503 and later.json()["error"]["code"] == "unavailable"
        assert client.get("/health").status_code == 503
