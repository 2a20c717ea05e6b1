"""Decode speed of SmoothQuant W8A8 against int8 weight-only and fp32 on SmolLM2-135M.

The quality of each variant is `bench_compress.py`'s job; this one only times batch-1
greedy decoding (prefill excluded) of the same model stored three ways, the rounds
interleaved so that a change in the machine's load touches every variant alike, each
keeping its best round. W8A8's scales come from a small calibration (their values do not
change the speed).

    python benchmarks/bench_w8a8_decode.py
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import PROMPT, lmforge_decoder  # noqa: E402
from machine import announce  # noqa: E402

from lmforge.compress.calibration import calibration_windows, default_calibration_files, token_stream  # noqa: E402
from lmforge.compress.grid import Grid  # noqa: E402
from lmforge.compress.quantize import quantize_model  # noqa: E402
from lmforge.infer.loading import load_model  # noqa: E402

#: the baselines are lmforge's own fp32 and int8 weight-only engines: no outside anchor
ANCHORS: tuple[str, ...] = ()

VARIANTS = [  # (label, method, options)
    ("int8 weight-only", "rtn", {}),
    ("W8A8 dynamic", "smoothquant", {"activations": "dynamic", "alpha": 0.5}),
    ("W8A8 static", "smoothquant", {"activations": "static", "alpha": 0.5}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    announce(())
    loaded = load_model("smollm2")
    base, tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
    calibration = calibration_windows(token_stream(tokenizer, default_calibration_files()), 4, 128)
    models = {"fp32": base}
    for label, method, options in VARIANTS:
        model = copy.deepcopy(base)
        quantize_model(model, method, Grid(8), calibration=calibration if method == "smoothquant" else None,
                       **options)
        models[label] = model
    prompt = tokenizer.encode(PROMPT)
    decoders = {label: lmforge_decoder(model, prompt, args.tokens) for label, model in models.items()}
    best = dict.fromkeys(decoders, 0.0)
    for _ in range(args.rounds):
        for label, decode in decoders.items():
            best[label] = max(best[label], decode())
    for label, speed in best.items():
        print(f"  {label:18s} {speed:7.1f} tok/s  ({speed / best['fp32']:.2f}x fp32, "
              f"{speed / best['int8 weight-only']:.2f}x int8 weight-only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
