"""Hardening: bad requests get the right 4xx in OpenAI's error shape; keys, body size, queue bound."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from lmforge.serve.app import create_app

HELLO = [{"role": "user", "content": "Hello"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def client(engine_factory):
    """One app for the whole module: the cases only read."""
    with TestClient(create_app({"tiny": engine_factory(max_seq_len=64)}, web_dir=None)) as client:
        yield client


def assert_openai_error(response, status: int, *, param: str | None = None,
                        fragment: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    if fragment is not None:
        assert fragment in error["message"], error["message"]
    return error


BAD = [
    # (id, path, body, status, param, fragment of the message)
    ("no-messages", CHAT, {"model": "tiny"}, 422, "messages", "required"),
    ("empty-messages", CHAT, {"messages": []}, 422, "messages", None),
    ("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages[0].role", None),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 422, None, None),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, None,
     None),
    ("messages-not-list", CHAT, {"messages": "hello"}, 422, "messages", None),
    ("temperature-high", CHAT, {"messages": HELLO, "temperature": 2.5}, 422, "temperature", None),
    ("temperature-string", CHAT, {"messages": HELLO, "temperature": "hot"}, 422, "temperature", None),
    ("top-p-zero", CHAT, {"messages": HELLO, "top_p": 0}, 422, "top_p", None),
    ("min-p-negative", CHAT, {"messages": HELLO, "min_p": -0.1}, 422, "min_p", None),
    ("top-k-negative", CHAT, {"messages": HELLO, "top_k": -5}, 422, "top_k", None),
    ("presence-penalty", CHAT, {"messages": HELLO, "presence_penalty": 3}, 422, "presence_penalty", None),
    ("frequency-penalty", COMPLETIONS, {"prompt": "a", "frequency_penalty": -2.5}, 422, "frequency_penalty",
     None),
    ("n-zero", CHAT, {"messages": HELLO, "n": 0}, 422, "n", None),
    ("n-too-many", CHAT, {"messages": HELLO, "n": 1000}, 422, "n", None),
    ("max-tokens-zero", CHAT, {"messages": HELLO, "max_tokens": 0}, 422, "max_tokens", None),
    ("max-completion-tokens-negative", CHAT, {"messages": HELLO, "max_completion_tokens": -1}, 422,
     "max_completion_tokens", None),
    ("too-many-stops", CHAT, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop", None),
    ("empty-stop", CHAT, {"messages": HELLO, "stop": ""}, 422, "stop", None),
    ("long-stop", CHAT, {"messages": HELLO, "stop": "x" * 1000}, 422, "stop", None),
    ("top-logprobs-high", CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 422,
     "top_logprobs", None),
    ("top-logprobs-without-logprobs", CHAT, {"messages": HELLO, "top_logprobs": 3}, 400, "top_logprobs",
     None),
    ("legacy-logprobs-high", COMPLETIONS, {"prompt": "a", "logprobs": 50}, 422, "logprobs", None),
    ("seed-huge", CHAT, {"messages": HELLO, "seed": 2**70}, 422, "seed", None),
    ("stream-not-bool", CHAT, {"messages": HELLO, "stream": "yes please"}, 422, "stream", None),
    ("stream-options-without-stream", CHAT, {"messages": HELLO, "stream_options": {"include_usage": True}},
     400, "stream_options", None),
    ("context-exceeded", CHAT, {"messages": [{"role": "user", "content": "word " * 60}]}, 400, "messages",
     "maximum context length is 64 tokens"),
    ("max-tokens-exceeds-context", CHAT, {"messages": HELLO, "max_tokens": 60}, 400, "messages",
     "60 for the reply"),
    ("prompt-too-long", COMPLETIONS, {"prompt": list(range(70))}, 400, "prompt", "64 tokens"),
    ("prompt-ids-outside-vocab", COMPLETIONS, {"prompt": [1, 2, 100000]}, 400, "prompt", "vocabulary"),
    ("prompt-negative-id", COMPLETIONS, {"prompt": [1, -2]}, 422, None, None),
    ("prompt-empty-list", COMPLETIONS, {"prompt": []}, 422, "prompt", None),
    ("prompt-empty-text", COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty"),
    ("prompt-missing", COMPLETIONS, {"max_tokens": 3}, 422, "prompt", "required"),
    ("batch-too-large", COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 6}, 400, "n", "18 replies"),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": HELLO}, 404, "model", "gpt-9"),
    ("tools", CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", None),
    ("functions", CHAT, {"messages": HELLO, "functions": [{"name": "f", "parameters": {}}]}, 400,
     "functions", "not supported"),
    ("json-mode", CHAT, {"messages": HELLO, "response_format": {"type": "json_object"}}, 400,
     "response_format", None),
    ("logit-bias", CHAT, {"messages": HELLO, "logit_bias": {"50": 10}}, 400, "logit_bias", None),
    ("echo", COMPLETIONS, {"prompt": "a", "echo": True}, 400, "echo", None),
    ("best-of", COMPLETIONS, {"prompt": "a", "best_of": 3}, 400, "best_of", None),
    ("tokenize-both", "/tokenize", {"prompt": "a", "messages": HELLO}, 422, None, "exactly one"),
    ("tokenize-neither", "/tokenize", {"model": "tiny"}, 422, None, "exactly one"),
    ("detokenize-outside-vocab", "/detokenize", {"tokens": [5, 99999]}, 400, "tokens", "vocabulary"),
    ("body-not-object", CHAT, [1, 2, 3], 422, None, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "fragment"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_requests_get_the_right_4xx(client, path, body, status, param, fragment):
    assert_openai_error(client.post(path, json=body), status, param=param, fragment=fragment)


def test_invalid_json_and_unknown_routes_are_openai_errors(client):
    broken = client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_openai_error(broken, 400, fragment="JSON")
    assert_openai_error(client.get("/v1/nothing"), 404, fragment="/v1/nothing")
    assert_openai_error(client.get(CHAT), 405)
    # bad requests leave nothing behind in the engine
    engine = client.app.state.catalog.get("tiny").engine
    assert not engine.has_unfinished() and not engine.sequences


def test_api_key_is_required_and_compared_exactly(engine_factory):
    app = create_app({"tiny": engine_factory()}, api_key="s3cret-key_42", web_dir=None)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret"},
                        {"Authorization": "Basic czNjcmV0"}, {"Authorization": "s3cret-key_42"}):
            for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("POST", "/tokenize"),
                                 ("GET", "/metrics")):
                response = client.request(method, path, json={"messages": HELLO}, headers=headers)
                error = assert_openai_error(response, 401)
                assert error["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer s3cret-key_42"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}, headers=good).status_code == 200
        # the key is checked before the body: a client without it learns nothing about validation
        assert client.post(CHAT, json={"messages": []}).status_code == 401
    for unusable in ("", "with space", "ключ"):
        with pytest.raises(ValueError, match="API key"):
            create_app({"tiny": engine_factory()}, api_key=unusable)


def test_oversized_bodies_get_413_before_being_read(engine_factory):
    app = create_app({"tiny": engine_factory()}, max_body_bytes=1000, web_dir=None)
    with TestClient(app) as client:
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        error = assert_openai_error(client.post(CHAT, json=big), 413, fragment="1000 bytes")
        assert error["code"] == "request_too_large"

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 200

        response = client.post(CHAT, content=chunked(), headers={"content-type": "application/json"})
        assert_openai_error(response, 413)
        assert client.post(CHAT, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(engine_factory):
    # one running slot and no waiting room: while one long reply runs, the next request is refused
    app = create_app({"tiny": engine_factory(max_batch_size=1, max_seq_len=512)}, max_queue=0, web_dir=None)
    worker = app.state.catalog.get("tiny").worker
    with TestClient(app) as client:
        long = {"messages": HELLO, "max_tokens": 480, "ignore_eos": True, "stream": True}
        with client.stream("POST", CHAT, json=long) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(lines)  # the first chunk: the request is running
            refused = client.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
            error = assert_openai_error(refused, 429, fragment="limit is 1")
            assert refused.headers["retry-after"] == "1" and error["code"] == "queue_full"
        # leaving the stream cancels it: the slot is free again
        ok = client.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
        assert ok.status_code == 200 and worker.outstanding == 0
        metrics = client.get("/metrics").text
        assert 'lmforge_request_rejected_total{model="tiny",reason="queue_full"} 1.0' in metrics
