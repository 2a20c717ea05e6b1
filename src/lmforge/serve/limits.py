"""Bounds on what one request may ask for, and how long and how large it may be to arrive.

A server shared by many clients must refuse requests that would take an unbounded share
of it before doing any work: the schema enforces the per-field bounds below (a 422),
`BodySizeLimit` refuses oversized bodies (a 413) before they are read into memory,
`JSONBodies` refuses bodies that are not JSON (a 415), the scheduler's bounded queue
refuses work beyond what it will get to soon (a 429), and `header_timeout_protocol`
drops a connection whose request line and headers do not arrive in time (a client
trickling one byte a second would otherwise hold its connection, and a file descriptor,
for ever: uvicorn times out idle keep-alive connections, not slow ones).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.errors import APIError, error_response

MAX_N = 16  # replies per request (n, or prompts x n for a batch of prompts)
MAX_PROMPTS = 16  # prompts in one legacy completions request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_MESSAGES = 1024  # messages in one conversation
MAX_TOKENS = 1 << 24  # a sanity bound on max_tokens; the model's context is the real one
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_EMBEDDING_INPUTS = 2048  # texts in one embeddings request (OpenAI's limit)
MAX_RETRIEVED = 16  # passages one chat request may retrieve
DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: about a million tokens of text
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for a request line and its headers to arrive


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 before it is read further.

    A declared `Content-Length` over the limit is refused at once; a chunked body is
    counted as it arrives and refused at the first byte over the limit (the handler
    never sees it: the body is buffered here, which the limit keeps small).
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                error = APIError(400, "the Content-Length header is not a number")
                await error_response(error)(scope, receive, send)
                return
            if size > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


class JSONBodies:
    """ASGI middleware: a request that has a body must say it is JSON (`Content-Type:
    application/json`, or any `*/*+json`), else a 415. A form-encoded body (curl's default
    for `-d`) or one without a type would otherwise reach the handlers as a confusing
    validation error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            headers = dict(scope.get("headers", ()))
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            json_like = media_type == b"application/json" or media_type.endswith(b"+json")
            if has_body and not json_like:
                sent = media_type.decode("latin-1") if media_type else "no Content-Type"
                error = APIError(415, f"the request body must be JSON (Content-Type: application/json), "
                                      f"not {sent}", code="unsupported_media_type")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def header_timeout_protocol(seconds: float = DEFAULT_HEADER_TIMEOUT) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`uvicorn.run(..., http=...)`), closing a connection
    whose next request line and headers have not all arrived `seconds` after it opened or
    after its last response ended.

    uvicorn starts a request cycle (`protocol.cycle`) when the headers are complete, in
    both its h11 and httptools protocols; a timer armed at each start checks that a new
    cycle has begun. A slow body, or a long streamed answer, is not affected."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_too_slow, self.cycle)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self, cycle_when_armed: Any) -> None:
            self._head_timer = None
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderTimeout.__name__ = HeaderTimeout.__qualname__ = f"HeaderTimeout{AutoHTTPProtocol.__name__}"
    return HeaderTimeout
