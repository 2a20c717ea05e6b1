"""Serving under load: a real `lmforge serve` process and many concurrent streaming clients.

Starts `lmforge serve --model smollm2` (SmolLM2-135M-Instruct) as a subprocess on a free
loopback port, then, for each concurrency level (1, 8, 32 clients by default), runs that
many asyncio clients (httpx), each sending streamed chat completions one after another
until the level's requests are done. Every request asks for exactly `--max-tokens`
tokens (greedy, `ignore_eos`), so the levels do the same work per request. Reported per
level, as clients see it:

- requests/s and output tokens/s (completion tokens from the usage chunk / wall time);
- time to first token (TTFT): from sending the request to its first content chunk;
- inter-token latency (ITL): the gaps between a reply's consecutive content chunks
  (each chunk is one token, except the rare token whose text is held back: an incomplete
  UTF-8 character), p50 / p90 / p99 over all replies;
- TPOT: (last chunk - first chunk) / (tokens - 1), the mean per-reply decode time.

    python benchmarks/bench_serve.py                         # 1, 8, 32 clients, 32 tokens each
    python benchmarks/bench_serve.py --concurrency 1 4 --max-tokens 16 --json serve.json
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000                 # a server already running

The server's own Prometheus metrics (`/metrics`) cover the same quantities from its side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from machine import announce

from lmforge.atomic import atomic_write

#: lmforge's server is measured on its own: no anchor (benchmarks/anchors.py)
ANCHORS: tuple[str, ...] = ()
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "What are three good habits for writing readable code?",
    "Describe how a bicycle stays upright.",
    "Give me a recipe idea that uses lentils.",
    "Why do cats purr?",
    "Summarize the water cycle for a ten-year-old.",
    "What is the difference between weather and climate?",
]


@dataclass
class Reply:
    started: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.started if self.chunk_times else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    reply = Reply(started=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                reply.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return reply
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    reply.error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        reply.chunk_times.append(time.perf_counter())
                if chunk.get("usage"):
                    reply.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        reply.error = f"{type(err).__name__}: {err}"
    return reply


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    replies: list[Reply] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            replies.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    ok = [r for r in replies if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "clients": clients, "requests": len(replies), "errors": len(replies) - len(ok),
        "first_error": next((r.error for r in replies if r.error), None),
        "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        **{f"ttft_p{int(q * 100)}_ms": percentile(ttfts, q) * 1000 for q in (0.5, 0.9, 0.99)},
        **{f"itl_p{int(q * 100)}_ms": percentile(gaps, q) * 1000 for q in (0.5, 0.9, 0.99)},
        "tpot_mean_ms": statistics.fmean(tpots) * 1000 if tpots else float("nan"),
    }


# ------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    return [sys.executable, "-m", "lmforge", "serve"]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = serve_command() + ["--model", args.model, "--port", str(port), "--log-level", "warning",
                                 "--max-batch-size", str(args.max_batch_size)]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    if args.quantize:
        command += ["--quantize", args.quantize]
    command += [arg for extra in args.server_arg for arg in extra.split()]
    print("starting:", " ".join(command[1:]), file=sys.stderr)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start within 10 minutes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="what `lmforge serve --model` loads")
    parser.add_argument("--url", help="benchmark a server that is already running instead of starting one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests per level = clients x this (at least --min-requests)")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's running batch")
    parser.add_argument("--server-threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAGS",
                        help="more flags for the server, e.g. --server-arg '--device cuda --dtype bfloat16'")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    machine = announce()  # the client's machine (the server's too, unless --url points elsewhere)

    process = None
    url = args.url
    if url is None:
        process, url = start_server(args)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(run_level(url, model, 1, 1, 4))  # warm-up: kernels compiled, caches touched
        results = []
        for clients in args.concurrency:
            requests = max(clients * args.requests_per_client, args.min_requests)
            result = asyncio.run(run_level(url, model, clients, requests, args.max_tokens))
            results.append(result)
            print(f"{clients:>3} clients: {result['requests_per_s']:.2f} req/s, "
                  f"{result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_p50_ms']:.0f} ms, "
                  f"ITL p50 {result['itl_p50_ms']:.1f} ms"
                  + (f", {result['errors']} errors ({result['first_error']})" if result["errors"] else ""),
                  file=sys.stderr)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    machine["load_average_after"] = os.getloadavg()
    print(f"\nmodel {model}, {args.max_tokens} tokens per reply (greedy, ignore_eos), server batch "
          f"{args.max_batch_size}; load average {machine['load_average_after'][0]:.1f} at the end\n")
    print("| clients | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) "
          "| ITL p50 / p90 / p99 (ms) | TPOT mean (ms) | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p90_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
              f"{r['tpot_mean_ms']:.1f} | {r['errors']} |")
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "results": results}, f, indent=2)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
