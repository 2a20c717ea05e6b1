"""A conversation's second turn with and without prefix caching: time to first token, SmolLM2-135M-Instruct.

Turn 1 is a long user message (a Python tutorial page, cut to about `--tokens` tokens of
prompt) and a `--reply`-token answer; turn 2 is the same conversation plus the answer and
a short follow-up question, as `lmforge chat` and any chat client send it. The engines:
the static cache (the default; with prefix caching its free slot keeps the conversation)
and the paged cache (whole blocks shared), each with prefix caching off and on (the
second turn then runs only what is new). Time to first token is the
prefill plus the first token; decode tokens/s is the answer's rate after it. Each engine
runs the pair `--repeats` times; the table gives medians.

Goal (issue 18): with prefix caching, turn 2's time to first token <= 20% of turn 1's.

    python benchmarks/bench_prefix_cache.py --tokens 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import announce  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402

ANCHORS: tuple[str, ...] = ()  # the anchor is the same engine without prefix caching, in the same run


def conversation_text(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of the Python tutorial (lmforge's python-docs sample)."""
    from lmforge.data.samples import python_docs_dir

    pages = sorted((python_docs_dir(quiet=True)).rglob("tutorial/*.txt"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in pages)
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)[:tokens]
    return tokenizer.decode(ids)


def turn(engine: Engine, messages: list[dict[str, str]], reply_tokens: int) -> tuple[float, float, str, int]:
    """(time to first token, decode tokens/s, reply, prompt tokens served from the cache)."""
    prompt = engine.tokenizer.encode_chat_prompt(messages)
    params = SamplingParams(temperature=0, max_tokens=reply_tokens, ignore_eos=True)
    started = time.perf_counter()
    rid = engine.add_request(prompt, params)
    first, text = None, []
    while engine.has_unfinished():
        for event in engine.step():
            if event.request_id == rid:
                first = first or time.perf_counter()
                text.append(event.text)
    stats = engine.stats(rid)
    engine.release(rid)
    return first - started, stats.decode_tokens_per_second, "".join(text), stats.cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="turn 1's prompt, about")
    parser.add_argument("--reply", type=int, default=32, help="tokens each answer has")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    announce()
    base = Engine.from_pretrained("smollm2", max_batch_size=1)
    tokenizer = base.tokenizer
    first_message = conversation_text(tokenizer, args.tokens - 40) + "\n\nSummarise this in one sentence."
    setups = {"static, no prefix caching": {"cache": "static", "prefix_caching": False},
              "static + prefix caching": {"cache": "static", "prefix_caching": True},
              "paged, no prefix caching": {"cache": "paged", "prefix_caching": False},
              "paged + prefix caching": {"cache": "paged", "prefix_caching": True}}
    rows = []
    for name, options in setups.items():
        times = {"ttft1": [], "ttft2": [], "decode1": [], "decode2": [], "cached2": []}
        for _ in range(args.repeats):  # a new engine each time: turn 1 never finds anything cached
            blocks = {"num_blocks": -(-(args.tokens + 4 * args.reply + 200) // 16) + 2} \
                if options["cache"] == "paged" else {}
            engine = Engine(base.model, tokenizer, stop_ids=sorted(base.eos_ids), max_batch_size=1, **blocks,
                            **options)
            messages = [{"role": "user", "content": first_message}]
            ttft1, decode1, reply, _ = turn(engine, messages, args.reply)
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": "And what is the most important point?"}]
            ttft2, decode2, _, cached2 = turn(engine, messages, args.reply)
            for key, value in zip(times, (ttft1, ttft2, decode1, decode2, cached2)):
                times[key].append(value)
        prompt2 = len(tokenizer.encode_chat_prompt(messages))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, med, prompt2))
        print(f"{name}: turn 1 TTFT {med['ttft1']:.2f} s, turn 2 TTFT {med['ttft2']:.2f} s "
              f"({med['ttft2'] / med['ttft1']:.0%}), decode {med['decode1']:.1f} / {med['decode2']:.1f} "
              f"tok/s, turn 2 cached {med['cached2']:.0f} of {prompt2} prompt tokens", flush=True)
    print("\n| engine | turn 1 TTFT | turn 2 TTFT | turn 2 / turn 1 | turn 2 tokens from cache "
          "| decode tok/s |")
    print("|---|---|---|---|---|---|")
    for name, med, prompt2 in rows:
        print(f"| {name} | {med['ttft1']:.2f} s | {med['ttft2']:.2f} s | {med['ttft2'] / med['ttft1']:.0%} | "
              f"{med['cached2']:.0f} of {prompt2} | {med['decode2']:.1f} |")


if __name__ == "__main__":
    main()
