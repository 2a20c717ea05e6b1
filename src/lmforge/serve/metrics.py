"""Prometheus metrics at `/metrics`: what an operator graphs and alerts on.

Counters and histograms are updated as requests are served; the gauges (requests
running and waiting per model) are read from the engine workers at scrape time. Each app
gets its own registry, so several apps in one process (tests) do not share numbers.
Names follow Prometheus conventions (`_total` for counters, base units: seconds).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.scheduler import EngineWorker

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineLoad(Collector):
    """Requests running in each engine's batch and waiting for a slot, read at scrape time."""

    def __init__(self, workers: Mapping[str, EngineWorker]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily("lmforge_requests_running", "Requests in the engine's running batch",
                                    labels=["model"])
        waiting = GaugeMetricFamily("lmforge_requests_waiting",
                                    "Requests accepted and waiting for a batch slot", labels=["model"])
        for name, worker in self.workers.items():
            n_running = worker.running()
            running.add_metric([name], n_running)
            waiting.add_metric([name], max(worker.outstanding - n_running, 0))
        yield running
        yield waiting


class ServerMetrics:
    def __init__(self, workers: Mapping[str, EngineWorker]) -> None:
        disable_created_metrics()  # the `_created` timestamp series only double the output (process-wide)
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("lmforge_http_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=r)
        self.finished = Counter("lmforge_request_finished", "Generation requests ended, by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.rejected = Counter("lmforge_request_rejected", "Generation requests refused before starting",
                                ["model", "reason"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens prefilled", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated", ["model"],
                                         registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds",
                             "Between consecutive tokens of one reply", ["model"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("lmforge_request_duration_seconds",
                                  "From the request's arrival to its last token", ["model"],
                                  buckets=_DURATION_BUCKETS, registry=r)
        r.register(_EngineLoad(workers))

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HTTPMetrics:
    """ASGI middleware: count every HTTP answer by route and status (unknown paths as "other",
    so that scanning clients cannot create unbounded label values)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else ("/web" if path.startswith("/web/") else "other")
        status = 500  # if the app fails before answering

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.http_requests.labels(route, str(status)).inc()
