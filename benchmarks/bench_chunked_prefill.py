"""Chunked prefill under load: time to first token with long and short prompts mixed, SmolLM2-135M-Instruct.

Engine-level (no HTTP): `--clients` closed-loop clients, each sending its next request as
soon as its previous reply ends, until `--requests` (per level: that many times the
clients) are done. Every `--long-every`-th request is a long prompt (about `--long`
tokens of the Python tutorial, a different passage each time, so prefix caching cannot
hide its prefill); the others are short chat questions. Replies are `--max-tokens`
greedy tokens. The engine runs with `prefill_chunk` set to each of `--chunks` (0: whole
prompts, the engine before chunking), interleaved run by run in one process, so that a
shared machine's load falls on all settings alike.

Reported per setting and level: time to first token (p50 / p95) of all requests and of the
short ones, the longest gap between two tokens of one reply (a stream stalled by
another's prefill), output tokens/s, wall time.

    python benchmarks/bench_chunked_prefill.py --clients 8 32 --chunks 0 512 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefix_cache import conversation_text  # noqa: E402
from bench_serve import PROMPTS, percentile  # noqa: E402
from machine import announce  # noqa: E402

from lmforge.atomic import atomic_write  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402

ANCHORS: tuple[str, ...] = ()  # the anchor is the same engine with whole-prompt prefill, in the same run


def prompts(engine: Engine, count: int, long_tokens: int, long_every: int) -> list[list[int]]:
    """`count` chat prompts: every `long_every`-th one a different long passage, the rest short questions."""
    tok = engine.tokenizer
    text = tok.encode(conversation_text(tok, long_tokens * count // long_every + long_tokens),
                      add_bos=False, add_eos=False)
    out = []
    for i in range(count):
        if i % long_every == 0:
            start = (i // long_every) * long_tokens
            passage = tok.decode(text[start:start + long_tokens])
            content = f"Summarize this passage in one sentence.\n\n{passage}"
        else:
            content = PROMPTS[i % len(PROMPTS)]
        out.append(tok.encode_chat_prompt([{"role": "user", "content": content}]))
    return out


def run_level(engine: Engine, requests: list[list[int]], clients: int, max_tokens: int) -> dict:
    """Closed-loop clients over one engine: (TTFT of each request, its longest token gap)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    pending = list(range(len(requests)))
    sent: dict[int, tuple[int, float]] = {}  # engine id -> (request index, time sent)
    times: dict[int, list[float]] = {}

    def send() -> None:
        i = pending.pop(0)
        rid = engine.add_request(requests[i], params)
        sent[rid] = (i, time.perf_counter())
        times[i] = []

    started = time.perf_counter()
    for _ in range(min(clients, len(pending))):
        send()
    while engine.has_unfinished():
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            times[sent[event.request_id][0]].append(now)
            if event.finish_reason:
                engine.release(event.request_id)
                if pending:
                    send()
    wall = time.perf_counter() - started
    starts = {i: t for i, t in sent.values()}
    ttft = {i: times[i][0] - starts[i] for i in times}
    gaps = [max((b - a for a, b in zip(t, t[1:])), default=0.0) for t in times.values()]
    return {"ttft": ttft, "max_gaps": gaps, "wall": wall,
            "tokens_per_s": sum(len(t) for t in times.values()) / wall}


def summarize(runs: list[dict], short: set[int]) -> dict:
    ttft = [v for r in runs for v in r["ttft"].values()]
    ttft_short = [v for r in runs for i, v in r["ttft"].items() if i in short]
    return {"ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "short_ttft_p50": percentile(ttft_short, 0.5), "short_ttft_p95": percentile(ttft_short, 0.95),
            "max_gap_p95": percentile([g for r in runs for g in r["max_gaps"]], 0.95),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "wall": statistics.median(r["wall"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, per level")
    parser.add_argument("--long", type=int, default=1500, help="tokens of each long passage")
    parser.add_argument("--long-every", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16, help="as lmforge serve's default")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = announce()

    engine = Engine.from_pretrained(args.model, max_batch_size=args.max_batch_size)
    warm = prompts(engine, 4, 200, 2)
    for chunk in args.chunks:  # warm-up: first calls, kernel loading, the cache's first growth
        engine.prefill_chunk = chunk or None
        run_level(engine, warm, 4, 4)
    results = []
    for clients in args.clients:
        requests = prompts(engine, clients * args.requests, args.long, args.long_every)
        short = {i for i in range(len(requests)) if i % args.long_every}
        runs: dict[int, list[dict]] = {c: [] for c in args.chunks}
        for _ in range(args.repeats):
            for chunk in args.chunks:  # interleaved: the machine's load falls on every setting alike
                engine.prefill_chunk = chunk or None
                engine.cache.forget_prefixes()  # no setting finds what the one before cached
                runs[chunk].append(run_level(engine, requests, clients, args.max_tokens))
                print(f"  clients {clients} chunk {chunk or 'off'}: {runs[chunk][-1]['wall']:.1f} s",
                      file=sys.stderr, flush=True)
        for chunk in args.chunks:
            results.append({"clients": clients, "chunk": chunk, **summarize(runs[chunk], short)})

    print(f"long prompts of ~{args.long} tokens every "
          f"{args.long_every}th request, {args.max_tokens} tokens each, max batch {args.max_batch_size}")
    print(f"{'clients':>7} {'chunk':>5} {'TTFT p50':>9} {'p95':>7} {'short p50':>10} {'p95':>7} "
          f"{'max gap p95':>11} {'tok/s':>6} {'wall':>6}")
    for r in results:
        print(f"{r['clients']:>7} {r['chunk'] or 'off':>5} {r['ttft_p50']:>8.2f}s {r['ttft_p95']:>6.2f}s "
              f"{r['short_ttft_p50']:>9.2f}s {r['short_ttft_p95']:>6.2f}s {r['max_gap_p95']:>10.2f}s "
              f"{r['tokens_per_s']:>6.1f} {r['wall']:>5.1f}s")
    off = {r["clients"]: r for r in results if r["chunk"] == 0}
    for r in results:
        if r["chunk"] and r["clients"] in off:
            base = off[r["clients"]]
            print(f"clients {r['clients']}, chunk {r['chunk']} vs off: TTFT p50 "
                  f"{r['ttft_p50'] / base['ttft_p50']:.2f}x, p95 {r['ttft_p95'] / base['ttft_p95']:.2f}x, "
                  f"short p50 {r['short_ttft_p50'] / base['short_ttft_p50']:.2f}x")
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
