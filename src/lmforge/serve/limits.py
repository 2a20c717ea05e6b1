"""Bounds on what one request may ask for, and the request-body size limit.

A server shared by many clients must refuse requests that would take an unbounded share
of it before doing any work: the schema enforces the per-field bounds below (a 422),
`BodySizeLimit` refuses oversized bodies (a 413) before they are read into memory, and
the scheduler's bounded queue refuses work beyond what it will get to soon (a 429).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.errors import APIError, error_response

MAX_N = 16  # replies per request (n, or prompts x n for a batch of prompts)
MAX_PROMPTS = 16  # prompts in one legacy completions request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_MESSAGES = 1024  # messages in one conversation
MAX_TOKENS = 1 << 24  # a sanity bound on max_tokens; the model's context is the real one
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: about a million tokens of text


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
