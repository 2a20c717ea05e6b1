"""Quantization-aware training on SmolLM2-135M: held-out perplexity against post-training rounding.

Same protocol as bench_compress.py: the `smollm2` sample dequantized to fp32, scored on 32
windows of 512 tokens of the Python *tutorial* (never trained on); QAT trains on the
Python *HOWTOs* token stream (the calibration text) through `lmforge.compress.qat`
(RTN start, learned ranges, the int8 head). The RTN, GPTQ and AWQ rows at the same bits
are deterministic and are quoted from docs/benchmarks.md ("## Compression"); `--rtn`
measures the RTN rows again in this run as a check. `--twin` also trains the float model
the same way (same text, steps, learning rate) without the rounding: how much of QAT's
gain is the text itself rather than recovering from the rounding.

    python benchmarks/bench_qat.py --json qat.json                 # ~1 hour on 2 shared cores
    python benchmarks/bench_qat.py --steps 2 --heldout-windows 2    # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import announce  # noqa: E402

from lmforge.compress.calibration import (  # noqa: E402
    default_calibration_files,
    default_heldout_files,
    heldout_windows,
    token_stream,
)
from lmforge.compress.grid import Grid  # noqa: E402
from lmforge.compress.qat import QATConfig, qat_quantize, train_fake_quantized  # noqa: E402
from lmforge.compress.quantize import quantize_model  # noqa: E402
from lmforge.eval.perplexity import perplexity  # noqa: E402
from lmforge.infer.loading import load_model  # noqa: E402

#: the baselines are lmforge's own post-training rounding (RTN, GPTQ, AWQ): no outside anchor
ANCHORS: tuple[str, ...] = ()

#: docs/benchmarks.md "## Compression" (same model, same 32 x 512 held-out windows, 32 x 512 calibration)
TABLE = {"fp32": 13.339, "RTN 4-bit g64": 17.836, "GPTQ 4-bit g64 act-order": 15.010, "AWQ 4-bit g64": 14.698,
         "RTN 3-bit g64": 117.291, "GPTQ 3-bit g64": 39.455, "AWQ 3-bit g64": 23.527}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--range-lr", type=float, default=2e-4)
    parser.add_argument("--heldout-windows", type=int, default=32, help="held-out windows of 512 tokens")
    parser.add_argument("--rtn", action="store_true", help="measure the RTN rows again")
    parser.add_argument("--twin", action="store_true", help="also train the float model the same way")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = announce(())

    loaded = load_model("smollm2")
    base, tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
    train = token_stream(tokenizer, default_calibration_files())
    heldout = heldout_windows(token_stream(tokenizer, default_heldout_files()), 512,
                              limit=args.heldout_windows)
    config = QATConfig(steps=args.steps, lr=args.lr, range_lr=args.range_lr, batch=args.batch,
                       micro_batch=args.batch, seq_len=args.seq_len, warmup_steps=max(1, args.steps // 10))
    print(f"\n  model: {loaded.path.name} (fp32); QAT on the Python HOWTOs ({len(train):,} tokens), "
          f"{config.steps} steps of {config.batch} x {config.seq_len} tokens, lr {config.lr:g} (ranges "
          f"{config.range_lr:g}); held out {heldout.shape[0]} x {heldout.shape[1]} tokens (the tutorial)\n",
          flush=True)
    rows: list[dict[str, Any]] = []

    def record(label: str, model, **extra) -> None:
        score = perplexity(model, heldout)
        rows.append({"label": label, "perplexity": score.perplexity, **extra})
        quoted = "  ".join(f"{k} {v:.3f}" for k, v in TABLE.items() if f"{extra.get('bits', 'x')}-bit" in k)
        print(f"  {label:28s} ppl {score.perplexity:8.3f}   (table: {quoted})", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows,
                                                   "table": TABLE}, indent=2) + "\n")

    for bits in args.bits:
        grid = Grid(bits, 64)
        if args.rtn:
            model = copy.deepcopy(base)
            quantize_model(model, "rtn", grid)
            record(f"RTN {bits}-bit g64", model, bits=bits)
        model = copy.deepcopy(base)
        report = qat_quantize(model, grid, train, config)
        record(f"QAT {bits}-bit g64", model, bits=bits, seconds=report.train_seconds,
               train_tokens=report.train_tokens, first_loss=report.first_loss, final_loss=report.final_loss)
        del model
    if args.twin:
        model = copy.deepcopy(base)
        summary = train_fake_quantized(model, train, config)
        record("fp32 trained the same way", model, seconds=summary["seconds"],
               train_tokens=summary["tokens_seen"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
