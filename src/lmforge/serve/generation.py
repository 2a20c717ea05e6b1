"""The event-loop side of one request's generation: start it, read its tokens, cancel it.

`start` hands the job to the model's engine thread and waits until the engine has
accepted it, so that anything the engine refuses is still a proper 4xx answer (a
streamed response has already sent "200 OK" by the time its first token arrives).
Iterating a `Generation` yields the engine's token batches until every choice has
finished; `close` cancels whatever is still running, which frees its KV cache at the
engine's next step. Time to first token, inter-token latency and token counts go to the
metrics here, where the client's view of time is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from lmforge.infer.sampling import SamplingParams
from lmforge.serve.catalog import ServedModel
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.scheduler import Accepted, Failed, Job, NotAccepting, QueueFull, Rejected, Tokens


class Generation:
    def __init__(self, model: ServedModel, job: Job, metrics: ServerMetrics, arrived: float,
                 accepted: Accepted) -> None:
        self.model = model
        self.job = job
        self.metrics = metrics
        self.arrived = arrived
        self.prompt_tokens = accepted.prompt_tokens
        self.completion_tokens = [0] * job.size
        self.finish_reasons: list[str | None] = [None] * job.size
        self._last_token_at: list[float | None] = [None] * job.size
        self._open = job.size
        self.closed = False

    @property
    def finished(self) -> bool:
        return self._open == 0

    async def batches(self) -> AsyncIterator[Tokens]:
        """Token batches in the order the engine produced them, until every choice ends."""
        while self._open:
            message = await self.job.queue.get()
            if isinstance(message, Failed):
                self._open = 0
                raise APIError(500, f"generation failed: {message.error}", code="engine_error")
            if isinstance(message, Tokens):
                self._record(message)
                yield message

    def _record(self, batch: Tokens) -> None:
        labels = (self.model.id,)
        k = len(batch.events)
        self.completion_tokens[batch.choice] += k
        self.metrics.generation_tokens.labels(*labels).inc(k)
        last = self._last_token_at[batch.choice]
        if last is None:
            self.metrics.ttft.labels(*labels).observe(max(batch.at - self.arrived, 0.0))
            k -= 1  # the first token has no gap before it
        if k > 0:
            gap = max(batch.at - (last if last is not None else batch.at), 0.0) / k
            itl = self.metrics.itl.labels(*labels)
            for _ in range(k):
                itl.observe(gap)
        self._last_token_at[batch.choice] = batch.at
        reason = batch.events[-1].finish_reason
        if reason is not None:
            self.finish_reasons[batch.choice] = reason
            self.metrics.finished.labels(self.model.id, reason).inc()
            self._open -= 1
            if not self._open:
                self.metrics.duration.labels(*labels).observe(time.perf_counter() - self.arrived)

    def close(self) -> None:
        """Cancel what is still running (the client left, or the response failed)."""
        if self.closed:
            return
        self.closed = True
        if self._open:
            self.model.worker.cancel(self.job)
            self.metrics.finished.labels(self.model.id, "cancelled").inc(self._open)
            self._open = 0

    def prompt_token_total(self, prompt_of_choice: Sequence[int]) -> int:
        """Prompt tokens counted once per distinct prompt (n replies share one prompt)."""
        seen: dict[int, int] = {}
        for choice, prompt in enumerate(prompt_of_choice):
            seen.setdefault(prompt, self.prompt_tokens[choice])
        return sum(seen.values())


async def start(model: ServedModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                metrics: ServerMetrics, arrived: float) -> Generation:
    """Submit a job and wait for the engine to accept it; refusals become 4xx/5xx `APIError`s."""
    try:
        job = model.worker.submit(prompts, params)
    except QueueFull as err:
        metrics.rejected.labels(model.id, "queue_full").inc()
        raise APIError(429, str(err), code="queue_full", headers={"Retry-After": "1"}) from err
    except NotAccepting as err:
        metrics.rejected.labels(model.id, "unavailable").inc()
        raise APIError(503, str(err), code="unavailable") from err
    try:
        message = await job.queue.get()
    except asyncio.CancelledError:  # the request was abandoned while the engine took the job
        model.worker.cancel(job)
        raise
    if isinstance(message, Rejected):
        metrics.rejected.labels(model.id, "invalid").inc()
        raise bad_request(str(message.error)) from message.error
    if isinstance(message, Failed):
        raise APIError(500, f"generation failed: {message.error}", code="engine_error")
    assert isinstance(message, Accepted)
    metrics.prompt_tokens.labels(model.id).inc(sum(message.prompt_tokens))
    return Generation(model, job, metrics, arrived, message)
