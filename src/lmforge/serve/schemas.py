"""The server's request and response bodies as pydantic models.

They validate every request before any work is done (types, ranges, lengths: a bad
field is a 422 naming it) and they are the OpenAPI schema at `/openapi.json`, which is
what clients and the schemathesis tests read. Field names, defaults and shapes follow
OpenAI's API; lmforge's extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`)
are those vLLM also accepts. Unknown fields are ignored, as OpenAI's own SDKs expect;
known OpenAI features lmforge does not implement (tools and their legacy form functions,
JSON mode, logit bias, echo, suffix) are refused by the handlers rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from lmforge.serve.limits import (
    MAX_EMBEDDING_INPUTS,
    MAX_MESSAGES,
    MAX_N,
    MAX_PROMPTS,
    MAX_RETRIEVED,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
)

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------- requests
class StreamOptions(_Body):
    include_usage: bool = Field(False, description="end the stream with a chunk carrying the token usage")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    def as_template_input(self) -> dict[str, str]:
        """What a chat template reads: role and plain-text content ("developer" is the new
        name of "system", which is the one templates know)."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class SamplingRequest(_Body):
    """The fields chat and legacy completions share."""

    model: str | None = Field(None, max_length=512,
                              description="a model id from /v1/models (optional when one model is served)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="lmforge/vLLM extra; 0 or -1 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="lmforge/vLLM extra")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="lmforge/vLLM extra; 1 = off")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N, description="replies per prompt")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="lmforge/vLLM extra: keep generating past end-of-text tokens")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Retrieval(_Body):
    """lmforge extra: answer from an index served with `--rag-index NAME=FOLDER` (see lmforge.rag)."""

    index: str = Field(max_length=128, description="the index's NAME")
    k: int = Field(4, ge=1, le=MAX_RETRIEVED, description="passages retrieved for the last user message")
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    retrieval: Retrieval | None = Field(
        None, description="lmforge extra: retrieve passages for the last user message, put them in the "
                          "prompt as numbered sources and return them in `sources`")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS,
                                              description="the newer name of max_tokens")
    logprobs: bool = Field(False, description="each token's log-probability in choices[].logprobs.content")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: the most likely alternatives per token")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    functions: list[dict[str, Any]] | None = Field(None, description="tools' legacy form; not supported: "
                                                                     "must be empty")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"} is supported')


class CompletionRequest(SamplingRequest):
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1,
                                                                                     max_length=MAX_PROMPTS)])
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="report log-probabilities and this many alternatives per token")
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: must be empty")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of = n is supported")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text, or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Body):
    model: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(True, description="for a prompt: add the tokenizer's BOS/EOS if it does")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class EmbeddingRequest(_Body):
    model: str | None = Field(None, max_length=512, description="an embedding model id from /v1/models")
    input: (Annotated[str, StringConstraints(max_length=1 << 20)]
            | Annotated[list[Annotated[str, StringConstraints(max_length=1 << 20)]],
                        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
            | Annotated[list[TokenId], Field(min_length=1)]
            | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]) = Field(
        description="text or a list of texts (token ids are refused: they would be another tokenizer's)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes (the openai client's "
                             "default)")
    dimensions: int | None = Field(None, ge=1, description="only the model's own dimension is supported")
    user: str | None = None


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=512)
    tokens: list[TokenId]


# ---------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    max_model_len: int = Field(description="the model's context: prompt + reply tokens (vLLM's name)")
    task: Literal["generate", "embed"] = Field(
        "generate", description="lmforge extra (vLLM's word): generation, or /v1/embeddings only")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RagIndexCard(BaseModel):
    name: str = Field(description="what a chat request's retrieval.index names")
    passages: int
    embedder: str | None = Field(description="the embedding model that built it (None: BM25 only)")


class RagIndexList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RagIndexCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None


class Source(BaseModel):
    """A retrieved passage placed in the prompt as source `number` (lmforge extra)."""

    number: int
    source: str = Field(description="the file or URL the passage came from")
    text: str
    headings: list[str]
    score: float = Field(description="the retrieval score (cosine, BM25 or fused ranks, by mode)")
    relevance: float = Field(description="cosine similarity of question and passage (BM25 score without an "
                                         "embedder)")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    sources: list[Source] | None = Field(None, description="lmforge extra, with `retrieval`: the passages "
                                                           "the reply was given, numbered as it cites them")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 float32 bytes with encoding_format")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class TokenizeResponse(BaseModel):
    tokens: list[int]
    token_strs: list[str] = Field(description="each token's bytes as text (UTF-8, invalid bytes as U+FFFD)")
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "shutting down"]
    models: list[str]
