"""Compression on SmolLM2-135M: perplexity on held-out text, size and decode speed, per method.

Every variant starts from the same float model (the `smollm2` sample dequantized to fp32)
and is scored on the same held-out windows: the Python *tutorial* (reST sources from the
`web` data sample), never used for calibration; calibration is drawn from the Python
*HOWTOs* (128 windows of 512 tokens by default, GPTQ's and AWQ's usual amount).

Rows:
- fp32, and lmforge's `quantize`: RTN, GPTQ and AWQ at 4 bits (groups of 64: SmolLM2's
  576-wide inputs cannot be cut into groups of 128) and 3 bits, GPTQ with act-order,
  8 bits per channel (RTN), and SmoothQuant W8A8 (dynamic and static activation scales,
  alpha searched or 0.5; W8A8 without smoothing shows what smoothing buys);
  the head is int8 per channel (weight-only) in every quantized row.
- llama.cpp's Q4_0 and Q4_K_M of the same model: an F32 GGUF written by `lmforge export`,
  quantized by llama.cpp's own `llama_model_quantize`, scored by llama.cpp on the same
  token ids (logits of every position through `llama_cpp.Llama`).
- lmforge's `prune`: magnitude, Wanda and SparseGPT at 50% and 2:4 (dense storage), and
  structured: 25% of the MLP channels, one of SmolLM2's three key/value head groups, 25%
  of the blocks (smaller matrices: these rows' decode speed is measured each).

Size: the bytes of the written folder's weights (or the GGUF file). Decode: batch-1 greedy
tokens/s (prefill excluded) for one row per storage format (the method does not change
the speed of a format). Goals (the compression issue): GPTQ and AWQ 4-bit lose at most
half the perplexity RTN 4-bit loses; Wanda and SparseGPT at 50% at most half of what
magnitude pruning loses.

    python benchmarks/bench_compress.py --json compress.json     # ~1 hour on 2 cores
    python benchmarks/bench_compress.py --smoke                  # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import require  # noqa: E402
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
from lmforge.compress.layerwise import walk_blocks  # noqa: E402
from lmforge.compress.prune import Sparsity, prune_model  # noqa: E402
from lmforge.compress.quantize import quantize_head, quantize_model  # noqa: E402
from lmforge.compress.run import stored_bytes  # noqa: E402
from lmforge.compress.smoothquant import w8a8_block  # noqa: E402
from lmforge.compress.structured import shrink_model  # noqa: E402
from lmforge.eval.perplexity import perplexity  # noqa: E402
from lmforge.infer.loading import load_model  # noqa: E402
from lmforge.infer.quantized_folder import save_quantized  # noqa: E402
from lmforge.model.checkpoint import save_checkpoint  # noqa: E402

#: what lmforge is run against: llama.cpp's own quantizer and evaluator (benchmarks/anchors.py)
ANCHORS = ("llama_cpp",)
QUANTIZED = [  # (label, method, bits, group, options for quantize_model)
    ("RTN int8 per channel", "rtn", 8, 64, {}),
    ("SmoothQuant W8A8 dynamic", "smoothquant", 8, 64, {"activations": "dynamic"}),
    ("SmoothQuant W8A8 static", "smoothquant", 8, 64, {"activations": "static"}),
    ("SmoothQuant W8A8 dynamic a0.5", "smoothquant", 8, 64, {"activations": "dynamic", "alpha": 0.5}),
    ("RTN 4-bit g64", "rtn", 4, 64, {}),
    ("GPTQ 4-bit g64", "gptq", 4, 64, {}),
    ("GPTQ 4-bit g64 act-order", "gptq", 4, 64, {"act_order": True}),
    ("AWQ 4-bit g64", "awq", 4, 64, {}),
    ("RTN 3-bit g64", "rtn", 3, 64, {}),
    ("GPTQ 3-bit g64", "gptq", 3, 64, {}),
    ("AWQ 3-bit g64", "awq", 3, 64, {}),
]
PRUNED = [(f"{m} {s}", m, s) for s in ("0.5", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
STRUCTURED = [("channels 25%", "channels", 0.25), ("heads 1 of 3 groups", "heads", 0.34),
              ("layers 25%", "layers", 0.25)]
LLAMACPP = [("llama.cpp Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("llama.cpp Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M")]


def llamacpp_quantize(f32: Path, out: Path, ftype: str, threads: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")
    return out


def llamacpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> tuple[float, float]:
    """(perplexity, seconds): llama.cpp's logits at every position of each window, the same NLL as ours."""
    import llama_cpp

    length = windows.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, n_ubatch=length,
                          logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    total, count, started = 0.0, 0, time.perf_counter()
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:length - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        total += float((logz - logits[np.arange(length - 1), window[1:]]).sum())
        count += length - 1
    return math.exp(total / count), time.perf_counter() - started


def text_windows(tokenizer, samples: int, seq_len: int, heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration [samples, seq_len] at random offsets of the Python HOWTOs, held out [<= heldout,
    seq_len] consecutive windows of the Python tutorial): the text every compression row sees."""
    calibration = calibration_windows(token_stream(tokenizer, default_calibration_files()), samples, seq_len)
    scored = heldout_windows(token_stream(tokenizer, default_heldout_files()), seq_len, limit=heldout)
    return calibration, scored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per window (calibration and held out)")
    parser.add_argument("--heldout-windows", type=int, default=32, help="held-out windows scored")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, help="labels (substrings) of the rows to run")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="--samples 4 --seq-len 128 --heldout-windows 2, "
                                                             "a few rows")
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.seq_len, args.heldout_windows, args.decode_tokens = 4, 128, 2, 8
        args.only = args.only or ["fp32", "RTN 4-bit", "GPTQ 3-bit", "AWQ 3-bit", "wanda 0.5", "Q4_0"]
    if not args.no_llamacpp:
        require(*ANCHORS, skip_hint="run with --no-llamacpp")
    torch.set_num_threads(args.threads)
    machine = announce(("llama-cpp-python",))

    loaded = load_model("smollm2")
    base, tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
    calibration, heldout = text_windows(tokenizer, args.samples, args.seq_len, args.heldout_windows)
    prompt = tokenizer.encode(PROMPT)
    print(f"\n  model: {loaded.path.name} (fp32), calibration {calibration.shape[0]} x "
          f"{calibration.shape[1]} tokens (Python HOWTOs), held out {heldout.shape[0]} x {heldout.shape[1]} "
          f"tokens (Python tutorial)\n")

    def wanted(label: str) -> bool:
        return args.only is None or any(s.lower() in label.lower() for s in args.only)

    rows: list[dict[str, Any]] = []
    decode_by_format: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))

    def save(goals: list | None = None) -> None:  # after every row: a crash keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows,
                                                   "goals": goals or []}, indent=2) + "\n")

    def record(label: str, model, folder: Path | None, seconds: float, fmt: str | None, **extra) -> None:
        score = perplexity(model, heldout)
        row = {"label": label, "perplexity": score.perplexity,
               "bytes": stored_bytes(folder) if folder else None, "compress_seconds": seconds,
               "eval_seconds": score.seconds, **extra}
        if fmt is not None and fmt not in decode_by_format:
            measure = lmforge_decoder(model, prompt, args.decode_tokens)
            decode_by_format[fmt] = max(measure() for _ in range(2))
        row["decode_tokens_per_s"] = decode_by_format.get(fmt)
        rows.append(row)
        save()
        size = f"{row['bytes'] / 1e6:7.1f} MB" if row["bytes"] else "      -   "
        speed = f"{row['decode_tokens_per_s']:6.1f} tok/s" if row["decode_tokens_per_s"] else "     -     "
        print(f"  {label:28s} ppl {row['perplexity']:8.3f}  {size}  {speed}  ({seconds:.0f} s to make)",
              flush=True)

    if wanted("fp32"):
        folder = save_checkpoint(work / "fp32", base, tokenizer=tokenizer)
        record("fp32", base, folder, 0.0, "fp32")
    for label, method, bits, group, options in QUANTIZED:
        if not wanted(label):
            continue
        model = copy.deepcopy(base)
        report = quantize_model(model, method, Grid(bits, group), calibration=calibration, **options)
        folder = save_quantized(work / label.replace(" ", "_").replace(",", ""), model, tokenizer=tokenizer)
        fmt = f"w8a8 {options['activations']}" if method == "smoothquant" else "int8" if bits == 8 else "int4"
        record(label, model, folder, report.seconds, fmt, method=method, bits=bits, **options)
        del model
    if wanted("W8A8 dynamic, not smoothed"):  # the same layers, activations rounded as they come
        model = copy.deepcopy(base)
        started = time.perf_counter()
        walk_blocks(model, calibration, lambda i, block, seen: w8a8_block(block, seen, "dynamic"), xtx=False)
        quantize_head(model, Grid(8), "int8")  # as quantize_model's default head
        folder = save_quantized(work / "w8a8-plain", model, tokenizer=tokenizer)
        record("W8A8 dynamic, not smoothed", model, folder, time.perf_counter() - started, "w8a8 dynamic")
        del model
    if not args.no_llamacpp and any(wanted(label) for label, _ in LLAMACPP):
        from lmforge.export import export_model

        f32 = work / "smollm2-f32.gguf"
        export_model("smollm2", "gguf", f32, dtype="f32")
        for label, ftype in LLAMACPP:
            if not wanted(label):
                continue
            started = time.perf_counter()
            path = llamacpp_quantize(f32, work / f"{ftype}.gguf", ftype, args.threads)
            made = time.perf_counter() - started
            ppl, seconds = llamacpp_perplexity(path, heldout, args.threads)
            decode = max(llamacpp_decoder(path, prompt, args.decode_tokens, args.threads)() for _ in range(2))
            rows.append({"label": label, "perplexity": ppl, "bytes": stored_bytes(path),
                         "compress_seconds": made, "eval_seconds": seconds, "decode_tokens_per_s": decode})
            save()
            print(f"  {label:28s} ppl {ppl:8.3f}  {stored_bytes(path) / 1e6:7.1f} MB  {decode:6.1f} tok/s  "
                  f"({made:.0f} s to make)", flush=True)
    for label, method, pattern in PRUNED:
        if not wanted(label):
            continue
        model = copy.deepcopy(base)
        report = prune_model(model, method, Sparsity.parse(pattern), calibration=calibration)
        record(label, model, None, report.seconds, None, method=method, sparsity=pattern)
        del model

    for label, structure, fraction in STRUCTURED:
        if not wanted(label):
            continue
        model, report = shrink_model(copy.deepcopy(base), structure, fraction, calibration)
        folder = save_checkpoint(work / label.replace(" ", "_"), model, tokenizer=tokenizer)
        record(label, model, folder, report.seconds, label, structure=structure, kept=report.kept,
               parameters=report.parameters_after)
        del model

    by_label = {r["label"]: r["perplexity"] for r in rows}
    goals = []
    if "fp32" in by_label:
        def loss(label: str) -> float | None:
            return by_label[label] - by_label["fp32"] if label in by_label else None

        def half_of(label: str, baseline: str) -> None:
            """The goal that `label` loses at most half the perplexity `baseline` loses."""
            mine, theirs = loss(label), loss(baseline)
            if mine is not None and theirs is not None:
                goals.append({"goal": f"{label} loses <= half of {baseline}'s perplexity",
                              "ratio": mine / theirs, "met": mine <= 0.5 * theirs})

        for bits in (4, 3):
            for method in ("GPTQ", "AWQ"):
                half_of(f"{method} {bits}-bit g64", f"RTN {bits}-bit g64")
            half_of(f"GPTQ {bits}-bit g64 act-order", f"RTN {bits}-bit g64")
        for pattern in ("0.5", "2:4"):
            for method in ("wanda", "sparsegpt"):
                half_of(f"{method} {pattern}", f"magnitude {pattern}")
        speed = {r["label"]: r["decode_tokens_per_s"] for r in rows}
        for label, _structure, fraction in STRUCTURED:
            if label in speed and fraction <= 0.26:
                ratio = speed[label] / speed["fp32"]
                goals.append({"goal": f"{label} decodes >= 1.25x faster than fp32", "ratio": ratio,
                              "met": ratio >= 1.25})
    if goals:
        print()
        for g in goals:
            print(f"  {g['goal']}: ratio {g['ratio']:.3f} -> {'met' if g['met'] else 'NOT met'}")
    save(goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
