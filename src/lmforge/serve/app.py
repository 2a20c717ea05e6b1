"""lmforge's OpenAI-compatible HTTP API: the routes, and `create_app` that puts them together.

```
GET  /                      the playground page (web/index.html); /web/* its static files
GET  /health                200 while serving (open even with an API key)
GET  /docs                  the API reference, one page without scripts (/openapi.json: the schema)
GET  /v1/models             OpenAI's model list, each with max_model_len; /v1/models/{id} one of them
POST /v1/chat/completions   chat, streamed (SSE) or not, with logprobs, n, seed, stop, penalties
POST /v1/completions        legacy text completions (prompt: text, ids, or a batch of either)
POST /v1/embeddings         sentence embeddings from an embedding model (`--model minilm`)
GET  /rag/indexes           the indexes chat requests may retrieve from (`--rag-index`)
POST /tokenize              text or a conversation -> token ids and their strings
POST /detokenize            token ids -> text
GET  /metrics               Prometheus text format
```

Chat requests may carry `retrieval` (an index served with `--rag-index`): see `retrieval.py`.
Requests are validated by the pydantic models in `schemas.py` and by `translate.py`,
reach the model's engine thread through `scheduler.py`, and come back as OpenAI bodies
or SSE chunks built by `responses.py`. Every error is OpenAI-shaped (`errors.py`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from lmforge.infer.engine import Engine
from lmforge.rag.answer import AnswerConfig
from lmforge.rag.embed import Embedder
from lmforge.rag.retrieve import Retriever
from lmforge.serve.auth import check_api_key, require_api_key
from lmforge.serve.catalog import Catalog
from lmforge.serve.docs import docs_response
from lmforge.serve.errors import APIError, install_error_handlers
from lmforge.serve.generation import start
from lmforge.serve.limits import DEFAULT_MAX_BODY_BYTES, MAX_N, BodySizeLimit, JSONBodies
from lmforge.serve.metrics import HTTPMetrics, ServerMetrics
from lmforge.serve.responses import (
    Reply,
    chat_completion,
    collect,
    completion,
    stream_chat,
    stream_completion,
    token_text,
)
from lmforge.serve.retrieval import EmbeddingModels, abstain_response, ground, stream_abstain
from lmforge.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingList,
    EmbeddingRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    RagIndexCard,
    RagIndexList,
    Source,
    TokenizeRequest,
    TokenizeResponse,
)
from lmforge.serve.sse import EventStreamResponse
from lmforge.serve.translate import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    chat_max_tokens,
    chat_prompt_ids,
    completion_max_tokens,
    completion_prompt_ids,
    fit_reply,
    refuse_unsupported,
    sampling_params,
    text_prompt_ids,
)
from lmforge.tokenizer import TokenizerError

WEB_DIR = Path(__file__).parent / "web"

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 429, 503)}
# With stream: true, the answer is server-sent events; before OpenAPI 3.2 (`itemSchema`) a
# text/event-stream schema describes one event, as schemathesis reads it.
_EVENT = {"type": "object", "required": ["data"],
          "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"},
                         "event": {"type": "string"}}}
_STREAMED = {200: {"content": {"text/event-stream": {"schema": _EVENT}},
                   "description": "the response, or with stream: true a stream of server-sent events"}}


class _OptionalStaticFiles(StaticFiles):
    """Static files from a folder that may not exist yet: 404s until it does, instead of failing."""

    async def check_config(self) -> None:
        if self.directory is not None and Path(self.directory).is_dir():
            await super().check_config()


def _disconnect_probe(request: Request, every: float = 0.25) -> Callable[[], Awaitable[bool]]:
    """`request.is_disconnected`, asked at most every `every` seconds."""
    last = 0.0

    async def gone() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < every:
            return False
        last = now
        return await request.is_disconnected()

    return gone


def create_app(models: Mapping[str, Engine], *, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, web_dir: Path | None = WEB_DIR,
               shutdown_timeout: float | None = 60.0, embedders: Mapping[str, Embedder] | None = None,
               retrievers: Mapping[str, Retriever] | None = None) -> FastAPI:
    """An app serving `models` ({id: Engine}); each model gets an engine thread.

    `embedders` ({id: Embedder}) answer /v1/embeddings; `retrievers` ({name: Retriever})
    are the indexes a chat request's `retrieval` may name.

    `api_key`: required as `Authorization: Bearer KEY` on every API route. `max_queue`:
    engine requests per model that may wait for a batch slot (beyond `max_batch_size`
    running) before new ones get a 429. `max_body_bytes`: larger request bodies get a
    413. `web_dir`: the playground's folder (served at `/` and `/web`). `shutdown_timeout`:
    how long shutdown waits for the engines to finish what they were given.
    """
    if api_key is not None:
        check_api_key(api_key)
    embedding = EmbeddingModels(embedders or {})
    catalog = Catalog(models, max_queue=max_queue, others=list(embedding.models))
    metrics = ServerMetrics(catalog.workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in catalog:
            model.worker.start()
        yield
        # The server has stopped accepting connections and waited for open requests;
        # the engines finish anything still queued, then their threads end.
        for model in catalog:
            await run_in_threadpool(model.worker.stop, shutdown_timeout)

    # FastAPI's /docs and /redoc load their scripts from a CDN: ours is one local page.
    app = FastAPI(title="lmforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible API over lmforge's inference engine.")
    app.state.catalog = catalog
    app.state.metrics = metrics
    install_error_handlers(app)
    _add_open_routes(app, catalog, web_dir)
    app.include_router(_api_routes(catalog, metrics, api_key, embedding, dict(retrievers or {})))
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(JSONBodies)  # added after, runs before: a form body is refused unread
    routes = frozenset({"/", "/health", "/docs", "/v1/models", "/v1/chat/completions", "/v1/completions",
                        "/v1/embeddings", "/rag/indexes", "/tokenize", "/detokenize", "/metrics"})
    app.add_middleware(HTTPMetrics, metrics=metrics, routes=routes)
    return app


def _add_open_routes(app: FastAPI, catalog: Catalog, web_dir: Path | None) -> None:
    """What needs no API key: the health check, the playground and these docs."""

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}}, tags=["server"])
    async def health() -> Health:
        if not all(m.worker.alive() for m in catalog):
            raise APIError(503, "the server is shutting down or an engine has stopped", code="unavailable")
        return Health(status="ok", models=list(catalog.models))

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> FileResponse:
        index = (web_dir / "index.html") if web_dir is not None else None
        if index is None or not index.is_file():
            raise APIError(404, "the playground is not installed (no web/index.html); the API is under /v1")
        return FileResponse(index)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return docs_response(app.openapi())

    if web_dir is not None:
        app.mount("/web", _OptionalStaticFiles(directory=web_dir, check_dir=False), name="web")


def _api_routes(catalog: Catalog, metrics: ServerMetrics, api_key: str | None, embedding: EmbeddingModels,
                retrievers: dict[str, Retriever]) -> APIRouter:
    """The OpenAI routes and lmforge's own, behind the API key when there is one."""
    api = APIRouter(dependencies=[Depends(require_api_key(api_key))], responses=_ERRORS)
    started = int(time.time())
    guard = AnswerConfig()

    def card(model_id: str) -> ModelCard:
        if model_id in embedding:
            limit = embedding.models[model_id].max_tokens
            return ModelCard(id=model_id, created=started, max_model_len=limit, task="embed")
        served = catalog.get(model_id)  # no `root`: where the checkpoint lies on disk is the operator's
        return ModelCard(id=served.id, created=int(served.worker.started_at),
                         max_model_len=served.max_model_len)

    @api.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models() -> ModelList:
        return ModelList(data=[card(m.id) for m in catalog] + [card(name) for name in embedding.models])

    @api.post("/v1/embeddings", response_model=EmbeddingList, tags=["openai"])
    async def embeddings(body: EmbeddingRequest) -> EmbeddingList:
        return await embedding.embed(body)

    @api.get("/rag/indexes", response_model=RagIndexList, tags=["lmforge"])
    async def rag_indexes() -> RagIndexList:
        cards = [RagIndexCard(name=name, passages=len(r.index.chunks), embedder=r.index.embedder_name)
                 for name, r in retrievers.items()]
        return RagIndexList(data=cards)

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"])
    async def get_model(model_id: str) -> ModelCard:
        return card(model_id)

    @api.post("/v1/chat/completions", response_model=ChatCompletion, responses=_STREAMED, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        served = catalog.get(body.model)
        refuse_unsupported(body)
        tokenizer = served.tokenizer
        sources = None
        if body.retrieval is not None:
            reply_room = min(chat_max_tokens(body) or guard.max_tokens, served.max_model_len - 1)
            grounded = await ground(retrievers, body.retrieval, body.messages, tokenizer,
                                    context=served.max_model_len, max_tokens=reply_room,
                                    min_relevance=guard.min_relevance)
            if not grounded.messages:
                if body.stream:
                    include_usage = bool(body.stream_options and body.stream_options.include_usage)
                    return EventStreamResponse(stream_abstain(served.id, body.n, include_usage=include_usage))
                return abstain_response(served.id, body.n)
            sources = [s.model_dump() for s in grounded.sources]
            prompt = await run_in_threadpool(tokenizer.encode_chat_prompt, grounded.messages)
        else:
            prompt = await run_in_threadpool(chat_prompt_ids, tokenizer, body.messages)
        max_tokens = fit_reply(len(prompt), chat_max_tokens(body), served.max_model_len, param="messages")
        top = body.top_logprobs or 0
        params = [sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, top_logprobs=top,
                                  choice=i) for i in range(body.n)]
        gen = await start(served, [prompt] * body.n, params, metrics, arrived)
        reply = Reply.new("chatcmpl", served.id, tokenizer, logprobs=body.logprobs,
                          prompt_of_choice=[0] * body.n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(stream_chat(reply, gen, include_usage=include_usage, sources=sources))
        texts, events = await collect(gen, until_disconnected=_disconnect_probe(request))
        response = chat_completion(reply, gen, texts, events)
        if sources is not None:
            response.sources = [Source(**s) for s in sources]
        return response

    @api.post("/v1/completions", response_model=Completion, responses=_STREAMED, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        served = catalog.get(body.model)
        refuse_unsupported(body)
        n_prompts = len(body.prompts())
        if n_prompts * body.n > MAX_N:
            raise APIError(400, f"{n_prompts} prompts x n={body.n} is {n_prompts * body.n} replies; "
                                f"at most {MAX_N} per request", param="n")
        tokenizer = served.engine.tokenizer
        if tokenizer is None and any(isinstance(p, str) for p in body.prompts()):
            raise APIError(400, f"model {served.id!r} has no tokenizer: send token ids", param="prompt")
        prompts = await run_in_threadpool(completion_prompt_ids, tokenizer, body, served.vocab_size)
        budgets = [fit_reply(len(ids), completion_max_tokens(body), served.max_model_len,
                             param="prompt" if n_prompts == 1 else f"prompt[{i}]",
                             default=COMPLETIONS_DEFAULT_MAX_TOKENS) for i, ids in enumerate(prompts)]
        logprobs = body.logprobs is not None
        jobs = [(p, sampling_params(body, max_tokens=m, logprobs=logprobs, top_logprobs=body.logprobs or 0,
                                    choice=j))
                for p, m in zip(prompts, budgets) for j in range(body.n)]
        gen = await start(served, [p for p, _ in jobs], [s for _, s in jobs], metrics, arrived)
        reply = Reply.new("cmpl", served.id, tokenizer, logprobs=logprobs,
                          prompt_of_choice=[i // body.n for i in range(len(jobs))])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStreamResponse(stream_completion(reply, gen, include_usage=include_usage))
        texts, events = await collect(gen, until_disconnected=_disconnect_probe(request))
        return completion(reply, gen, texts, events)

    @api.post("/tokenize", response_model=TokenizeResponse, tags=["lmforge"])
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        served = catalog.get(body.model)
        tokenizer = served.tokenizer
        if body.messages is not None:
            ids = await run_in_threadpool(chat_prompt_ids, tokenizer, body.messages,
                                          add_generation_prompt=body.add_generation_prompt)
        else:
            ids = await run_in_threadpool(text_prompt_ids, tokenizer, body.prompt or "",
                                          add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, token_strs=[token_text(tokenizer, i) for i in ids],
                                count=len(ids), max_model_len=served.max_model_len)

    @api.post("/detokenize", response_model=DetokenizeResponse, tags=["lmforge"])
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        served = catalog.get(body.model)
        try:
            return DetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))
        except TokenizerError as err:
            raise APIError(400, str(err), param="tokens") from err

    @api.get("/metrics", response_class=Response, tags=["server"],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return api
