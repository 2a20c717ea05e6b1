"""The engine's token events in OpenAI's shapes: whole responses and streamed chunks.

Chat completions report log-probabilities per token as
`choices[].logprobs.content[] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`;
legacy completions use the older parallel lists `tokens / token_logprobs / top_logprobs
({token: logprob}) / text_offset` (each token's character offset in the returned text).
A token's string is its bytes decoded as UTF-8 with U+FFFD for a partial character; its
`bytes` are exact. Log-probabilities are clamped to -9999 (JSON has no -infinity).
Streams end with an optional usage chunk (`stream_options.include_usage`) and
`data: [DONE]`; an error after the stream began arrives as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.infer.engine import TokenEvent
from lmforge.serve.errors import APIError
from lmforge.serve.generation import Generation
from lmforge.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletion,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from lmforge.serve.sse import DONE, event
from lmforge.tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def token_bytes(tokenizer: Tokenizer | None, token_id: int) -> bytes:
    return tokenizer.token_bytes(token_id) if tokenizer is not None else b""


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


@dataclass
class Reply:
    """What every response of one request shares."""

    id: str
    created: int
    model: str
    tokenizer: Tokenizer | None
    logprobs: bool
    prompt_of_choice: list[int]  # which prompt each choice continues

    @classmethod
    def new(cls, prefix: str, model: str, tokenizer: Tokenizer | None, *, logprobs: bool,
            prompt_of_choice: list[int]) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, tokenizer, logprobs,
                   prompt_of_choice)

    def usage(self, gen: Generation) -> Usage:
        prompt = gen.prompt_token_total(self.prompt_of_choice)
        completion = sum(gen.completion_tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # ---- chat's log-probabilities
    def _top(self, token_id: int, logprob: float) -> dict[str, Any]:
        data = token_bytes(self.tokenizer, token_id)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": clamp_logprob(logprob),
                "bytes": list(data)}

    def chat_logprobs(self, events: Sequence[TokenEvent]) -> list[dict[str, Any]]:
        entries = []
        for e in events:
            entry = self._top(e.token_id, e.logprob if e.logprob is not None else 0.0)
            entry["top_logprobs"] = [self._top(t.token_id, t.logprob) for t in (e.top_logprobs or ())]
            entries.append(entry)
        return entries

    # ---- legacy completions' log-probabilities
    def completion_logprobs(self, events: Sequence[TokenEvent], offset: int) -> tuple[dict[str, Any], int]:
        """The legacy lists for these tokens, their text offsets starting at `offset`; and the next offset."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for e in events:
            text = token_text(self.tokenizer, e.token_id)
            tokens.append(text)
            logprobs.append(clamp_logprob(e.logprob if e.logprob is not None else 0.0))
            tops.append({token_text(self.tokenizer, t.token_id): clamp_logprob(t.logprob)
                         for t in (e.top_logprobs or ())})
            offsets.append(offset)
            offset += len(text)
        lists = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
        return lists, offset


# ---------------------------------------------------------------------- whole responses
async def collect(gen: Generation, *,
                  until_disconnected: Any = None) -> tuple[list[str], list[list[TokenEvent]]]:
    """Every choice's text and events, once all have finished. `until_disconnected`: an async
    callable that says whether the client left (checked between batches)."""
    texts: list[list[str]] = [[] for _ in range(gen.job.size)]
    events: list[list[TokenEvent]] = [[] for _ in range(gen.job.size)]
    try:
        async for batch in gen.batches():
            texts[batch.choice].extend(e.text for e in batch.events)
            events[batch.choice].extend(batch.events)
            if until_disconnected is not None and await until_disconnected():
                break
    finally:
        gen.close()
    return ["".join(t) for t in texts], events


def chat_completion(reply: Reply, gen: Generation, texts: list[str],
                    events: list[list[TokenEvent]]) -> ChatCompletion:
    choices = []
    for i, (text, evs) in enumerate(zip(texts, events)):
        logprobs = None
        if reply.logprobs:
            logprobs = ChatChoiceLogprobs(content=[TokenLogprobEntry(
                token=e["token"], logprob=e["logprob"], bytes=e["bytes"],
                top_logprobs=[TopLogprob(**t) for t in e["top_logprobs"]]) for e in reply.chat_logprobs(evs)])
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=text), logprobs=logprobs,
                                  finish_reason=gen.finish_reasons[i]))
    return ChatCompletion(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                          usage=reply.usage(gen))


def completion(reply: Reply, gen: Generation, texts: list[str], events: list[list[TokenEvent]]) -> Completion:
    choices = []
    for i, (text, evs) in enumerate(zip(texts, events)):
        logprobs = CompletionLogprobs(**reply.completion_logprobs(evs, 0)[0]) if reply.logprobs else None
        choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs,
                                        finish_reason=gen.finish_reasons[i]))
    return Completion(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                      usage=reply.usage(gen))


# ---------------------------------------------------------------------- streams
async def stream_chat(reply: Reply, gen: Generation, *, include_usage: bool,
                      sources: list[dict[str, Any]] | None = None) -> AsyncIterator[bytes]:
    """The chunks of a streamed chat reply; `sources` (retrieval's passages) ride on the first ones."""
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None,
              extra: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                                "model": reply.model, "choices": choices, **(extra or {})}
        if include_usage:
            body["usage"] = usage
        return event(body)

    first = {"sources": sources} if sources is not None else None
    try:
        for i in range(gen.job.size):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], extra=first)
        async for batch in gen.batches():
            text = "".join(e.text for e in batch.events)
            finish = batch.events[-1].finish_reason
            if not (text or finish or reply.logprobs):
                continue  # a token whose text is held back (a partial character or stop string)
            yield chunk([{
                "index": batch.choice,
                "delta": {"content": text} if text else {},
                "logprobs": {"content": reply.chat_logprobs(batch.events)} if reply.logprobs else None,
                "finish_reason": finish,
            }])
        if include_usage:
            yield chunk([], reply.usage(gen).model_dump())
        yield DONE
    except APIError as err:
        yield event(err.body())
    finally:
        gen.close()


async def stream_completion(reply: Reply, gen: Generation, *, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {"id": reply.id, "object": "text_completion", "created": reply.created,
                                "model": reply.model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return event(body)

    offsets = [0] * gen.job.size
    try:
        async for batch in gen.batches():
            text = "".join(e.text for e in batch.events)
            finish = batch.events[-1].finish_reason
            if not (text or finish or reply.logprobs):
                continue
            logprobs = None
            if reply.logprobs:
                logprobs, offsets[batch.choice] = reply.completion_logprobs(batch.events,
                                                                            offsets[batch.choice])
            yield chunk([{"index": batch.choice, "text": text, "logprobs": logprobs,
                          "finish_reason": finish}])
        if include_usage:
            yield chunk([], reply.usage(gen).model_dump())
        yield DONE
    except APIError as err:
        yield event(err.body())
    finally:
        gen.close()
