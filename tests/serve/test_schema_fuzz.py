"""Schemathesis reads the app's OpenAPI schema and throws generated requests at every route,
valid and invalid ones: none may get a 5xx, and every answer must match the schema (a 4xx
in OpenAI's error shape). In-process (ASGI), a bounded number of examples per route and mode."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lmforge.serve.app import create_app  # noqa: E402

EXAMPLES = 15
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/rag/indexes"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/metrics"),
]
# Invalid input can be generated only where there is input to get wrong: the request bodies.
CASES = ([(m, p, "positive") for m, p in OPERATIONS]
         + [(m, p, "negative") for m, p in OPERATIONS if m == "POST"])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app(engine_factory):
    from lmforge.rag.embed import load_embedder

    return create_app({"tiny": engine_factory(max_seq_len=48, max_batch_size=8)}, web_dir=None,
                      embedders={"minilm": load_embedder("minilm")})


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_route_is_fuzzed(api_schema):
    found = sorted((op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations())
    assert found == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_server_errors_and_answers_match_the_schema(app, api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(checks=CHECKS)

    run()
    engine = app.state.catalog.get("tiny").engine
    assert not engine.sequences  # whatever was asked, nothing is left behind


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_streamed_answer_matches_the_schema(api_schema, path):
    """The fuzzing above meets a streamed 200 only now and then (it must draw stream: true and a
    prompt that fits): the schema once described a stream as a string, which failed then."""
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "The"}
    case = api_schema[path]["POST"].Case(body={**prompt, "stream": True, "max_tokens": 3},
                                         media_type="application/json")
    case.call_and_validate(checks=CHECKS)
