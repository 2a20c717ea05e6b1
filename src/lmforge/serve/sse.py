"""Server-sent events, and noticing at once when the client of a stream goes away.

A streamed completion is `text/event-stream`: each chunk is a `data: {json}` line and a
blank line, and the stream ends with `data: [DONE]` (OpenAI's convention). Starlette's
`StreamingResponse` notices a client that left only when a write fails and then leaves
the generator suspended; `EventStreamResponse` also listens for the disconnect message
while it streams, and always closes the generator, whose `finally` cancels the
generation. A client that hangs up mid-reply thus frees its slot and KV cache at the
engine's next step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(data: Any) -> bytes:
    """One SSE event carrying `data` as compact JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client went away during a write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                group.start_soon(watch_disconnect)
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
