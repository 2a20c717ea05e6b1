"""int8 activations on SmolLM2-135M: decode speed and accuracy, beside weight-only, fp32 and llama.cpp.

One run, one process. The same float model (the `smollm2` sample dequantized to fp32) is
stored as:
- int8 per channel and int4 (groups of 32, fp16 step and offset, like Q4_1; also with an
  int8 head, as the packaged Q4_1 file keeps its head at 8 bits), each weight-only and with
  int8 activations, integer products in the C kernel: a scale per 32 inputs
  (`Engine(activations="int8")`, as llama.cpp rounds its activations) and one per token
  (`activations="int8-token"`);
- SmoothQuant W8A8 (alpha 0.5, dynamic and static activation scales, calibrated on the
  Python HOWTOs), which before the integer kernel could not use the fused decode step.

Speed: batch-1 greedy decode tokens/s, prefill excluded, every contender once per round
(rounds interleaved, so a change in the machine's load touches all alike), best round kept;
llama.cpp F32 / Q8_0 (written by `lmforge export`) / Q4_1 (the packaged file) through its C
API in the same rounds. Accuracy: perplexity on the held-out Python tutorial (the windows
`bench_compress.py` scores; llama.cpp's Q8_0 and Q4_1 scored on the same token ids), and
greedy agreement with fp32: `--prompts` prompts (the start of held-out windows), `--new`
greedy tokens each; the share of prompts whose continuation is identical to fp32's, and the
mean share of tokens before the first difference. (Run it on an idle machine; on a shared one
the interleaved best-of rounds keep the ratios, not the absolute numbers.)

    python benchmarks/bench_int8_activations.py --json int8_activations.json   # ~15 minutes
    python benchmarks/bench_int8_activations.py --smoke --skip-llamacpp         # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import require  # noqa: E402
from bench_compress import llamacpp_perplexity  # noqa: E402
from bench_decode import PROMPT, llamacpp_decoder, lmforge_decoder  # noqa: E402
from machine import announce  # noqa: E402

from lmforge.compress.calibration import (  # noqa: E402
    calibration_windows,
    default_calibration_files,
    default_heldout_files,
    heldout_windows,
    token_stream,
)
from lmforge.compress.grid import Grid  # noqa: E402
from lmforge.compress.quantize import quantize_model as compress_model  # noqa: E402
from lmforge.eval.perplexity import perplexity  # noqa: E402
from lmforge.formats.gguf import GGUFFile  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.loading import load_model  # noqa: E402
from lmforge.infer.quant import int8_activations, quantize_model, weight_bytes  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.gguf import export_gguf, load_gguf_model  # noqa: E402

#: llama.cpp's engine runs its own files beside lmforge's (benchmarks/anchors.py)
ANCHORS = ("llama_cpp",)
#: (label, weights, head) and (label suffix, int8 activation scales: None for weight-only)
WEIGHTS = [("int8", "int8", True), ("int4", "int4", True), ("int4 head int8", "int4", "int8")]
SCALES = {"": None, ", a8 per 32": "block", ", a8 per token": "token"}


def variants(base, calibration: torch.Tensor) -> dict[str, torch.nn.Module]:
    models = {"fp32": base}
    for label, weights, head in WEIGHTS:
        for suffix, scales in SCALES.items():
            model = quantize_model(copy.deepcopy(base), weights, head=head)
            if scales:
                int8_activations(model, scales)
            models[label + suffix] = model
    for scales in ("dynamic", "static"):
        model = copy.deepcopy(base)
        compress_model(model, "smoothquant", Grid(8), calibration=calibration, activations=scales, alpha=0.5)
        models[f"W8A8 {scales}"] = model
    return models


def llamacpp_files(tmp: Path) -> dict[str, Path]:
    """F32 and Q8_0 GGUFs of the sample written by lmforge's exporter, and the packaged Q4_1 file."""
    path = load_model("smollm2").path
    config, state, _ = load_gguf_model(path)
    tokenizer_meta = {k: v for k, v in GGUFFile(path).metadata.items() if k.startswith("tokenizer.")}
    files = {kind: export_gguf(tmp / f"smollm2-{kind}.gguf", config, state, tokenizer_meta, dtype=kind)
             for kind in ("f32", "q8_0")}
    return files | {"q4_1": path}


def greedy_agreement(reference: list[list[int]], tokens: list[list[int]]) -> tuple[float, float]:
    """(share of identical continuations, mean share of tokens before the first difference)."""
    prefixes = []
    for ref, got in zip(reference, tokens):
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        prefixes.append(same / len(ref))
    return sum(p == 1.0 for p in prefixes) / len(prefixes), sum(prefixes) / len(prefixes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per speed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (calibration, held out)")
    parser.add_argument("--heldout-windows", type=int, default=32, help="held-out windows scored")
    parser.add_argument("--calibration", type=int, default=32, help="SmoothQuant calibration windows")
    parser.add_argument("--prompts", type=int, default=16, help="prompts for greedy agreement")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few tokens, windows and rounds")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.rounds, args.seq_len, args.heldout_windows = 16, 1, 128, 2
        args.calibration, args.prompts, args.new = 4, 4, 8
    if not args.skip_llamacpp:
        require(*ANCHORS, skip_hint="run with --skip-llamacpp")
    torch.set_num_threads(args.threads)
    machine = announce(() if args.skip_llamacpp else ("llama-cpp-python",))

    loaded = load_model("smollm2")
    base, tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
    stream = token_stream(tokenizer, default_heldout_files())
    heldout = heldout_windows(stream, args.seq_len, limit=args.heldout_windows)
    calibration = calibration_windows(token_stream(tokenizer, default_calibration_files()), args.calibration,
                                      args.seq_len)
    models = variants(base, calibration)
    ggufs = {} if args.skip_llamacpp else llamacpp_files(Path(tempfile.mkdtemp(prefix="bench-int8-act-")))

    # ---- speed: every contender once per round, rounds interleaved, best round kept
    prompt = tokenizer.encode(PROMPT)
    contenders = {("lmforge", label): lmforge_decoder(m, prompt, args.tokens) for label, m in models.items()}
    for kind, path in ggufs.items():
        contenders[("llama.cpp", kind)] = llamacpp_decoder(path, prompt, args.tokens, args.threads)
    best = dict.fromkeys(contenders, 0.0)
    for r in range(args.rounds):
        for key, measure in contenders.items():
            best[key] = max(best[key], measure())
        print(f"  speed round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    # ---- accuracy: held-out perplexity, greedy agreement with fp32
    stride = len(stream) // args.prompts  # prompts spread evenly over the held-out text
    prompts = [stream[i * stride:i * stride + args.prompt_tokens].tolist() for i in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    rows, reference = [], None
    for label, model in models.items():
        score = perplexity(model, heldout)
        tokens = [c.token_ids for c in Engine(model, max_batch_size=len(prompts)).complete(prompts, params)]
        reference = reference or tokens
        identical, prefix = greedy_agreement(reference, tokens)
        rows.append({"engine": "lmforge", "precision": label, "tokens_per_s": best[("lmforge", label)],
                     "weight_bytes": weight_bytes(model), "perplexity": score.perplexity,
                     "greedy_identical": identical, "greedy_prefix": prefix})
        print(f"  {label:30s} ppl {score.perplexity:7.3f}  greedy identical {identical:4.0%}  "
              f"prefix {prefix:4.0%}", file=sys.stderr, flush=True)
    for kind, path in ggufs.items():
        ppl = llamacpp_perplexity(path, heldout, args.threads)[0] if kind != "f32" else None
        rows.append({"engine": "llama.cpp", "precision": kind.upper(), "perplexity": ppl,
                     "tokens_per_s": best[("llama.cpp", kind)], "file_bytes": path.stat().st_size})

    fp32 = best[("lmforge", "fp32")]
    print(f"\n  SmolLM2-135M, batch 1, {args.threads} threads, best of {args.rounds} interleaved rounds; "
          f"held out {heldout.shape[0]} x {heldout.shape[1]} tokens; greedy {len(prompts)} prompts x "
          f"{args.new} tokens")
    print(f"  {'engine':10s} {'precision':30s} {'tok/s':>7s} {'x fp32':>7s} {'MB/token':>9s} {'ppl':>8s} "
          f"{'identical':>9s} {'prefix':>7s}")
    for row in rows:
        size = row.get("weight_bytes") or row.get("file_bytes")
        ppl = f"{row['perplexity']:8.3f}" if row["perplexity"] else f"{'-':>8s}"
        agree = (f"{row['greedy_identical']:9.0%} {row['greedy_prefix']:7.0%}" if "greedy_prefix" in row
                 else f"{'-':>9s} {'-':>7s}")
        print(f"  {row['engine']:10s} {row['precision']:30s} {row['tokens_per_s']:7.1f} "
              f"{row['tokens_per_s'] / fp32:6.2f}x {size / 1e6:9.1f} {ppl} {agree}")
    speed = {label: tps for (engine, label), tps in best.items() if engine == "lmforge"}
    for weights, _, _ in WEIGHTS:
        ratios = ", ".join(f"{suffix[2:]} {speed[weights + suffix] / speed[weights]:.2f}x"
                           for suffix in SCALES if suffix)
        print(f"  {weights}: vs weight-only: {ratios}")
    if ggufs:
        for ours, theirs in (("int8", "q8_0"), ("int4 head int8", "q4_1")):
            anchor = best[("llama.cpp", theirs)]
            ratios = ", ".join(f"{ours}{suffix or ' weight-only'} {speed[ours + suffix] / anchor:.2f}x"
                               for suffix in SCALES)
            print(f"  vs llama.cpp {theirs.upper()}: {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
