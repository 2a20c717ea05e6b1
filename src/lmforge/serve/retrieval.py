"""lmforge.rag behind the API: `/v1/embeddings`, and chat requests that retrieve before answering.

`lmforge serve --model minilm` serves a sentence encoder at OpenAI's `/v1/embeddings`
(text in, unit vectors out, as floats or as base64 float32 bytes, which the `openai`
client asks for by default). `--rag-index NAME=FOLDER` loads an index built by `lmforge
rag index` with the embedder that built it; a chat request carrying `"retrieval":
{"index": NAME, "k": 4}` (lmforge's extra, `extra_body=` in the openai client) then has
its last user message answered from the passages retrieved for it, exactly as `lmforge
rag ask` does (lmforge.rag.answer: the same prompt, relevance guard and room for the
reply), and gets them back numbered in `sources`. When nothing relevant is retrieved the
reply is "I don't know." and the model is not asked.

Embedding runs in a worker thread, one request at a time per model (a lock), so a large
batch does not starve the event loop and two batches do not fight over the cores.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from lmforge.rag.answer import DONT_KNOW, build_messages, relevant_hits
from lmforge.rag.embed import Embedder
from lmforge.rag.retrieve import Retriever
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    Retrieval,
    Source,
    Usage,
)
from lmforge.serve.sse import DONE, event

__all__ = ["EmbeddingModels", "Grounding", "abstain_response", "ground", "stream_abstain"]


class EmbeddingModels:
    """The embedding models a server holds, by id, each behind its own lock."""

    def __init__(self, models: Mapping[str, Embedder]) -> None:
        self.models = dict(models)
        self._locks = {name: threading.Lock() for name in self.models}

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def get(self, name: str | None) -> tuple[str, Embedder]:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.items()))
            names = ", ".join(self.models) or "none is served"
            raise bad_request(f"name an embedding model in 'model': {names}", param="model")
        if name not in self.models:
            raise APIError(404, f"{name!r} is not an embedding model on this server; embedding models: "
                                f"{', '.join(self.models) or 'none'}", param="model", code="model_not_found")
        return name, self.models[name]

    async def embed(self, body: EmbeddingRequest) -> EmbeddingList:
        name, embedder = self.get(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not all(isinstance(t, str) for t in texts):
            raise bad_request("send text: token ids would be another tokenizer's, not this model's",
                              param="input")
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise bad_request(f"{name} gives {embedder.dim}-dimensional vectors; "
                              f"dimensions={body.dimensions} is not supported", param="dimensions")

        def work() -> tuple[np.ndarray, int]:
            with self._locks[name]:
                ids = embedder.token_ids(texts)
                return embedder.encode_ids(ids), sum(map(len, ids))

        vectors, tokens = await run_in_threadpool(work)
        data = [EmbeddingData(index=i, embedding=_encoded(v, body.encoding_format))
                for i, v in enumerate(vectors)]
        usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        return EmbeddingList(data=data, model=name, usage=usage)


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


@dataclass
class Grounding:
    """A chat request after retrieval: the messages to send the model, and the sources they hold."""

    messages: list[dict[str, str]]
    sources: list[Source]


async def ground(retrievers: Mapping[str, Retriever], retrieval: Retrieval, messages: Sequence[ChatMessage],
                 tokenizer: Any, *, context: int, max_tokens: int, min_relevance: float) -> Grounding:
    """Retrieve for the last user message and build the prompt as `lmforge rag ask` does.

    Earlier turns stay as history; the client's system message gives way to the one that
    tells the model to answer from the sources. No relevant passage: empty `messages`."""
    retriever = retrievers.get(retrieval.index)
    if retriever is None:
        served = ", ".join(retrievers) or "none (start the server with --rag-index NAME=FOLDER)"
        raise APIError(404, f"no index named {retrieval.index!r} is served; indexes: {served}",
                       param="retrieval.index", code="index_not_found")
    turns = [m.as_template_input() for m in messages]
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise bad_request("with retrieval, the last message must be the user's question", param="messages")
    question = turns[-1]["content"].strip()
    history = [t for t in turns[:-1] if t["role"] != "system"]

    def work() -> Grounding:
        hits = retriever.search(question, retrieval.k, retrieval.mode)
        kept, relevance = relevant_hits(question, hits, retriever, min_relevance)
        if not kept:
            return Grounding([], [])
        try:
            prompt, fitted = build_messages(question, kept, tokenizer, context=context, max_tokens=max_tokens,
                                            history=history)
        except ValueError as err:
            raise bad_request(str(err), param="messages") from err
        sources = [Source(number=n, source=h.chunk.source, text=h.chunk.text, headings=list(h.chunk.headings),
                          score=h.score, relevance=r)
                   for n, (h, r) in enumerate(zip(kept[:fitted], relevance[:fitted]), start=1)]
        return Grounding(prompt, sources)

    return await run_in_threadpool(work)


def abstain_response(model: str, n: int) -> ChatCompletion:
    """The reply when nothing relevant was retrieved: "I don't know.", without asking the model."""
    choices = [ChatChoice(index=i, message=AssistantMessage(content=DONT_KNOW), finish_reason="stop")
               for i in range(n)]
    return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
                          choices=choices, usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                          sources=[])


async def stream_abstain(model: str, n: int, *, include_usage: bool) -> AsyncIterator[bytes]:
    """`abstain_response` as the chunks of a stream."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "sources": []}
    for i in range(n):
        yield event(base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": DONT_KNOW},
                                         "logprobs": None, "finish_reason": "stop"}]})
    if include_usage:
        yield event(base | {"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                     "total_tokens": 0}})
    yield DONE
