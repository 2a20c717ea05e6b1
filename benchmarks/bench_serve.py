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

Beside it, at every level and with the same clients, prompts and token counts:

- **llama-cpp-python's OpenAI server** (`python -m llama_cpp.server`, its `[server]` extra)
  on the same GGUF file, with the same threads (`--against llama-cpp`, the default when it
  is installed; `--against none` skips it). It answers one request at a time (no
  continuous batching), which is what a user of that server gets. It has no `ignore_eos`,
  so the model's stop tokens get a -100 logit bias instead: both sides write every token
  (a reply with fewer counts as an error). Its `--interrupt_requests` is turned off: by
  default a new request cuts the one being streamed.
- **lmforge's own engine in this process** (`Engine.from_pretrained` with the server's
  settings, `clients` requests in flight, refilled as each finishes): the server's output
  tokens/s as a share of it is what the HTTP layer (FastAPI, SSE, the event loop) costs.

The levels run in turns (lmforge serve, llama.cpp's server, the engine) so that a change in
the machine's load touches each alike. For like-for-like bits, give lmforge `--quantize
int4`: the `smollm2` sample is a Q4_1 GGUF, which the engine then runs from its own blocks.

The server's own Prometheus metrics (`/metrics`) cover the same quantities from its side.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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
import torch
from anchors import require
from machine import announce

from lmforge.atomic import atomic_write

#: llama-cpp-python's OpenAI server and its [server] extra (`--against none` measures lmforge alone)
ANCHORS = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
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


@dataclass(frozen=True)
class Target:
    """A server to load: its base URL, the model name it answers to, and what its requests add
    to the common body (lmforge: ignore_eos; llama.cpp: a logit bias against the stop tokens)."""

    name: str
    url: str
    model: str
    extra: dict = field(default_factory=dict)


async def one_request(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> Reply:
    body = {"model": target.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **target.extra}
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
    if not reply.tokens and reply.error is None:  # a server that sends no usage chunk: one token a chunk
        reply.tokens = len(reply.chunk_times)
    return reply


async def run_level(target: Target, clients: int, requests: int, max_tokens: int) -> dict:
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
            reply = await one_request(client, target, PROMPTS[i % len(PROMPTS)], max_tokens)
            if reply.error is None and reply.tokens != max_tokens:  # every reply must write every token
                reply.error = f"the reply stopped after {reply.tokens} of {max_tokens} tokens"
            replies.append(reply)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=target.url, timeout=1800, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarize(target.name, clients, replies, wall)


def summarize(name: str, clients: int, replies: list[Reply], wall: float) -> dict:
    ok = [r for r in replies if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "server": name, "clients": clients, "requests": len(replies), "errors": len(replies) - len(ok),
        "first_error": next((r.error for r in replies if r.error), None),
        "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        **{f"ttft_p{int(q * 100)}_ms": percentile(ttfts, q) * 1000 for q in (0.5, 0.9, 0.99)},
        **{f"itl_p{int(q * 100)}_ms": percentile(gaps, q) * 1000 for q in (0.5, 0.9, 0.99)},
        "tpot_mean_ms": statistics.fmean(tpots) * 1000 if tpots else float("nan"),
    }


def engine_level(engine, clients: int, requests: int, max_tokens: int) -> dict:
    """The same requests straight into an `Engine`, `clients` of them in flight at a time (as the
    HTTP clients keep them): what the server would do with no HTTP layer. Times are taken
    as each step's tokens come out, as a streaming client would see them."""
    from lmforge.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [engine.tokenizer.encode_chat_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
               for i in range(requests)]
    replies: dict[int, Reply] = {}
    started = time.perf_counter()
    sent = 0

    def send() -> None:
        nonlocal sent
        replies[engine.add_request(prompts[sent], params)] = Reply(started=time.perf_counter())
        sent += 1

    for _ in range(min(clients, requests)):
        send()
    while engine.has_unfinished():
        for event in engine.step():
            reply = replies[event.request_id]
            reply.chunk_times.append(time.perf_counter())
            reply.tokens += 1
            if event.finish_reason is not None:  # a client whose reply is done sends its next request
                engine.release(event.request_id)
                if sent < requests:
                    send()
    return summarize("lmforge engine", clients, list(replies.values()), time.perf_counter() - started)


# ------------------------------------------------------------------------------ the servers
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
    return launch(command, port, "/health")


def start_llama_cpp_server(gguf: str, threads: int, context: int) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI server on `gguf`, all layers on the CPU, `threads` threads."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(context),
               "--n_gpu_layers", "0", "--verbose", "False",
               # by default a new request interrupts the one being streamed: every client would
               # get a cut reply; queued one after another is what its single model slot can do
               "--interrupt_requests", "False"]
    return launch(command, port, "/v1/models")


def launch(command: list[str], port: int, ready_path: str) -> tuple[subprocess.Popen, str]:
    print("starting:", " ".join(command[1:]), file=sys.stderr)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start within 10 minutes")


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def gguf_of(model: str) -> str:
    """The GGUF file behind `--model` (a sample name or a path), for llama.cpp's server."""
    from lmforge.hub import resolve_model_path

    path = resolve_model_path(model)
    if path.suffix != ".gguf":
        raise SystemExit(f"--against llama-cpp needs a GGUF model; {model} is {path}")
    return str(path)


def stop_token_bias(engine) -> dict[str, float]:
    """-100 on the model's end-of-turn tokens: llama.cpp's stand-in for ignore_eos."""
    return {str(t): -100.0 for t in sorted(engine.eos_ids)}


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
    parser.add_argument("--against", choices=["llama-cpp", "none"], default=None,
                        help="also load llama-cpp-python's server (default: when it is installed)")
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine levels")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    machine = announce()  # the client's machine (the server's too, unless --url points elsewhere)
    if args.against is None:
        args.against = "llama-cpp" if importlib.util.find_spec("llama_cpp") else "none"
    if args.against == "llama-cpp":
        require(*ANCHORS, skip_hint="--against none")
    threads = args.server_threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    processes: list[subprocess.Popen] = []
    try:
        url = args.url
        if url is None:
            process, url = start_server(args)
            processes.append(process)
        targets = [Target("lmforge serve", url, served_model(url), {"ignore_eos": True})]
        engine = None
        if not args.no_engine or args.against == "llama-cpp":
            from lmforge.infer.engine import Engine

            engine = Engine.from_pretrained(args.model, quantize=args.quantize,
                                            max_batch_size=args.max_batch_size)
        if args.against == "llama-cpp":
            process, llama_url = start_llama_cpp_server(gguf_of(args.model), threads, engine.context)
            processes.append(process)
            targets.append(Target("llama.cpp server", llama_url, served_model(llama_url),
                                  {"logit_bias": stop_token_bias(engine)}))
        for target in targets:  # warm-up: kernels compiled, caches touched
            asyncio.run(run_level(target, 1, 1, 4))
        if engine is not None and not args.no_engine:
            engine_level(engine, 1, 1, 4)
        results = []
        for clients in args.concurrency:
            requests = max(clients * args.requests_per_client, args.min_requests)
            level = [asyncio.run(run_level(target, clients, requests, args.max_tokens)) for target in targets]
            if engine is not None and not args.no_engine:
                level.append(engine_level(engine, clients, requests, args.max_tokens))
            for r in level:
                print(f"{r['server']:>16}, {clients:>3} clients: {r['requests_per_s']:.2f} req/s, "
                      f"{r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                      f"ITL p50 {r['itl_p50_ms']:.1f} ms"
                      + (f", {r['errors']} errors ({r['first_error']})" if r["errors"] else ""),
                      file=sys.stderr)
            results += level
    finally:
        for process in processes:
            stop(process)

    machine["load_average_after"] = os.getloadavg()
    print(f"\nmodel {args.model} (lmforge: {args.quantize or 'as loaded'}), {args.max_tokens} tokens per "
          f"reply (greedy, every token written), lmforge's batch {args.max_batch_size}, {threads} threads; "
          f"load average {machine['load_average_after'][0]:.1f} at the end\n")
    print("| server | clients | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) "
          "| ITL p50 / p90 / p99 (ms) | TPOT mean (ms) | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p90_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
              f"{r['tpot_mean_ms']:.1f} | {r['errors']} |")
    ratios = level_ratios(results)
    if ratios:
        print("\n| clients | output tok/s: lmforge serve / llama.cpp server | TTFT p50: llama.cpp's / "
              "lmforge's | output tok/s: lmforge serve / its engine |")
        print("|---|---|---|---|")
        def cell(row: dict, key: str, unit: str = "") -> str:
            return f"{row[key]:.2f}{unit}" if key in row else "-"

        for clients, row in ratios.items():
            print(f"| {clients} | {cell(row, 'vs_llama_cpp_tokens', 'x')} | "
                  f"{cell(row, 'vs_llama_cpp_ttft', 'x')} | {cell(row, 'share_of_engine')} |")
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "results": results, "ratios": ratios}, f,
                      indent=2)
    return 1 if any(r["errors"] for r in results) else 0


def level_ratios(results: list[dict]) -> dict[int, dict[str, float]]:
    """Per concurrency: lmforge serve's output tokens/s over llama.cpp's server's, their TTFT p50
    over ours, and our server's tokens/s as a share of our engine's."""
    by = {(r["server"], r["clients"]): r for r in results}
    ratios: dict[int, dict[str, float]] = {}
    for clients in sorted({r["clients"] for r in results}):
        ours = by.get(("lmforge serve", clients))
        if ours is None:
            continue
        row: dict[str, float] = {}
        theirs = by.get(("llama.cpp server", clients))
        if theirs is not None and theirs["tokens_per_s"] > 0:
            row["vs_llama_cpp_tokens"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            row["vs_llama_cpp_ttft"] = theirs["ttft_p50_ms"] / ours["ttft_p50_ms"]
        engine = by.get(("lmforge engine", clients))
        if engine is not None and engine["tokens_per_s"] > 0:
            row["share_of_engine"] = ours["tokens_per_s"] / engine["tokens_per_s"]
        if row:
            ratios[clients] = row
    return ratios


if __name__ == "__main__":
    sys.exit(main())
