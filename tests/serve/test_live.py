"""A real uvicorn server on loopback: many concurrent streams, clients that hang up, graceful
shutdown, and OpenAI's own Python client (against a tiny model and against SmolLM2)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.app import create_app

HELLO = [{"role": "user", "content": "Hello"}]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_64_concurrent_streaming_clients_all_complete(engine_factory, serve):
    app = create_app({"tiny": engine_factory(max_batch_size=16)}, web_dir=None)
    clients = 64

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str, int, str | None]:
        request = {"messages": [{"role": "user", "content": f"Tell me about request {i}"}], "max_tokens": 12,
                   "ignore_eos": True, "temperature": 0.8, "seed": i, "stream": True,
                   "stream_options": {"include_usage": True}}
        text, usage, finish, done = [], None, None, False
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            status = response.status_code
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content", ""))
                    finish = choice["finish_reason"] or finish
                usage = chunk["usage"] or usage
        assert done, f"client {i}: no [DONE]"
        return status, "".join(text), usage["completion_tokens"], finish

    async def main(url: str):
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(clients)))

    with serve(app) as (url, _):
        started = time.perf_counter()
        results = asyncio.run(main(url))
        elapsed = time.perf_counter() - started
        worker = app.state.catalog.get("tiny").worker
        assert wait_until(lambda: worker.outstanding == 0)
        metrics = httpx.get(f"{url}/metrics").text
    assert [r[0] for r in results] == [200] * clients
    assert all(r[2] == 12 and r[3] == "length" for r in results)
    assert len({r[1] for r in results}) > clients // 2  # different seeds, different replies
    assert f'lmforge_request_finished_total{{finish_reason="length",model="tiny"}} {clients}.0' in metrics
    assert not worker.engine.sequences
    print(f"64 streaming clients x 12 tokens: {elapsed:.2f}s")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_cancels_its_generation(engine_factory, serve, stream):
    app = create_app({"tiny": engine_factory(max_batch_size=2, max_seq_len=4096)}, web_dir=None)
    worker = app.state.catalog.get("tiny").worker
    engine = worker.engine
    request = {"messages": HELLO, "max_tokens": 4000, "ignore_eos": True, "stream": stream}
    with serve(app) as (url, _):
        if stream:
            with httpx.Client(base_url=url, timeout=30) as client, \
                    client.stream("POST", "/v1/chat/completions", json=request) as response:
                lines = response.iter_lines()
                for _ in range(6):  # a few chunks: it is generating
                    next(lines)
                assert engine.has_unfinished()
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up while the reply is being generated
                httpx.post(f"{url}/v1/chat/completions", json=request, timeout=0.5)
        assert wait_until(lambda: not engine.has_unfinished() and worker.outstanding == 0)
        assert not engine.sequences  # released: nothing of the request is left in the engine
        assert not engine.cache._slot_of  # its KV-cache slot is free
        metrics = httpx.get(f"{url}/metrics").text
    assert 'lmforge_request_finished_total{finish_reason="cancelled",model="tiny"} 1.0' in metrics


def test_shutdown_finishes_requests_in_flight(engine_factory, serve):
    app = create_app({"tiny": engine_factory(max_seq_len=512)}, web_dir=None)
    engine = app.state.catalog.get("tiny").engine
    received: list[str] = []
    first_chunk = threading.Event()

    def stream(url: str) -> None:
        request = {"messages": HELLO, "max_tokens": 300, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line[6:])
                    first_chunk.set()

    with serve(app) as (url, server):
        reader = threading.Thread(target=stream, args=(url,))
        reader.start()
        assert first_chunk.wait(10)
        server.should_exit = True  # what SIGTERM / Ctrl-C does
        reader.join(60)
        assert wait_until(lambda: not server.started or server.should_exit)
    assert received[-1] == "[DONE]"
    chunks = [json.loads(r) for r in received[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not engine.has_unfinished()
    reference = engine_factory(max_seq_len=512)  # the same weights (same seed), untouched by the server
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(HELLO), add_bos=False)
    with torch.inference_mode():  # as the server runs it (a static cache grown by a forward pass needs it)
        greedy = reference.generate(prompt, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))
        expected = "".join(e.text for e in greedy)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


def test_openai_client_works_unchanged(engine_factory, serve):
    openai = pytest.importorskip("openai")
    app = create_app({"tiny": engine_factory()}, api_key="sk-test-123", web_dir=None)
    with serve(app) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test-123", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]

        chat = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
        choice = chat.choices[0]
        assert choice.finish_reason == "length" and chat.usage.completion_tokens == 6
        assert len(choice.logprobs.content) == 6 and len(choice.logprobs.content[0].top_logprobs) == 2

        chunks = list(client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content and chunks[-1].usage.completion_tokens == 6

        text = client.completions.create(model="tiny", prompt="The dog", max_tokens=5, temperature=0,
                                         logprobs=2, extra_body={"ignore_eos": True})
        assert len(text.choices[0].logprobs.tokens) == 5 and text.usage.completion_tokens == 5
        pieces = list(client.completions.create(model="tiny", prompt="The dog", max_tokens=5, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text

        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=500)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_smollm2_through_the_openai_client(smollm2, serve):
    openai = pytest.importorskip("openai")
    engine = Engine(smollm2.model, smollm2.tokenizer, stop_ids=smollm2.stop_ids(), max_batch_size=2)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(question), add_bos=False)
    expected = "".join(e.text for e in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=8)))
    with serve(create_app({"smollm2": engine}, web_dir=None)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="smollm2", messages=question, max_tokens=8,
                                               temperature=0)
        assert reply.choices[0].message.content == expected
        assert "Paris" in expected
        stream = client.chat.completions.create(model="smollm2", messages=question, max_tokens=8,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
