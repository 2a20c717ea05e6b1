"""Does a distilled student beat the same student trained from scratch on the same tokens?

SmolLM2-135M (the `smollm2` GGUF sample) teaches a 7M-parameter student (configs/distill/
smollm2-to-tiny.yaml: llama-tiny at d_model 128 with SmolLM2's 49,152-token vocabulary) on
the Python library reference. For each seed, two runs of `lmforge distill` with that recipe:
`alpha 0` (the hard next-token labels only: training from scratch) and the distillation
setting, from the same initial weights, on the same windows in the same order, for the same
steps. Both students, and the teacher once, are scored on the Python tutorial, which no run
trains on. The table gives the mean and spread over seeds, and the per-seed difference
(paired: same initialisation and data).

    python benchmarks/bench_distill.py --seeds 0 1 2 --json distill.json
    python benchmarks/bench_distill.py --seeds 0 --steps 5 --heldout-windows 4   # smoke

On a shared machine, seeds can run as parallel processes (`--seeds 1 --no-teacher`, one
process each: the teacher's score is the same for every run, measured once).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import announce  # noqa: E402

from lmforge.compress.distill_run import DistillConfig, distill, heldout_perplexity  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.data.samples import python_docs_dir  # noqa: E402
from lmforge.data.shards import TokenizeConfig, read_documents_from, tokenize_documents  # noqa: E402
from lmforge.infer.loading import load_model  # noqa: E402

#: the baseline is lmforge's own student trained from scratch: no outside anchor
ANCHORS: tuple[str, ...] = ()

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/distill/smollm2-to-tiny.yaml"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ensure_shards(folder: Path) -> Path:
    """The Python library reference (reST sources) in SmolLM2's tokens; the tutorial stays out."""
    if (folder / "meta.json").exists():
        return folder
    from lmforge.tokenizer import load_tokenizer

    library = python_docs_dir() / "_sources" / "library"
    print(f"tokenizing {library} with SmolLM2's tokenizer into {folder}", flush=True)
    report = tokenize_documents(read_documents_from([str(library)]), load_tokenizer("smollm2"), folder,
                                TokenizeConfig(val_fraction=0.01), tokenizer_name="smollm2")
    print(f"  {report.splits['train'].tokens:,} training tokens, {report.splits['val'].tokens:,} validation",
          flush=True)
    return folder


def score_teacher(args: argparse.Namespace) -> dict[str, float]:
    recipe = load_config(DistillConfig, args.recipe, [f"heldout_windows={args.heldout_windows}"])
    teacher = load_model(recipe.teacher)
    started = time.perf_counter()
    scored = heldout_perplexity(teacher.model, teacher.tokenizer, recipe.heldout, recipe.train.seq_len,
                                recipe.heldout_windows, lambda text: None)
    print(json.dumps({"teacher": scored, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return scored


def run_one(mode: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    alpha = 0.0 if mode == "scratch" else args.alpha
    overrides = [f"seed={seed}", f"output={args.out}/{mode}-seed{seed}", "resume=never",
                 f"data.folder={args.shards}", f"distill.alpha={alpha}", f"distill.kind={args.kind}",
                 f"distill.temperature={args.temperature}", f"heldout_windows={args.heldout_windows}",
                 "measure=[student]"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(DistillConfig, args.recipe, overrides)
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = distill(config, quiet=args.quiet)
    heldout = summary["heldout"]["student"]
    row = {"mode": mode, "seed": seed, "alpha": alpha, "kind": args.kind, "temperature": args.temperature,
           "steps": summary["steps"], "tokens": summary["tokens_seen"], "heldout_nll": heldout["nll"],
           "heldout_perplexity": heldout["perplexity"], "heldout_tokens": heldout["tokens"],
           "val_loss": summary.get("val_loss"), "final_loss": summary["final_loss"],
           "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
           "student_parameters": summary["student_parameters"], "bytes_after": summary["bytes_after"]}
    print(json.dumps(row), flush=True)
    return row


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict[str, Any]], teacher: dict[str, float] | None) -> str:
    lines = ["| student | seeds | steps (tokens) | held-out perplexity: mean ± sd (each seed) | "
             "held-out nll | wall per run |", "|---|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        ppl = [r["heldout_perplexity"] for r in mine]
        nll = [r["heldout_nll"] for r in mine]
        name = ("from scratch (alpha 0)" if mode == "scratch" else
                f"distilled ({mine[0]['kind']} KL, T={mine[0]['temperature']:g}, alpha {mine[0]['alpha']:g})")
        each = ", ".join(f"{p:.1f}" for p in ppl)
        lines.append(f"| {name} | {len(mine)} | {mine[0]['steps']} ({mine[0]['tokens']:,}) | "
                     f"{statistics.fmean(ppl):.1f} ± {_spread(ppl):.1f} ({each}) | "
                     f"{statistics.fmean(nll):.3f} ± {_spread(nll):.3f} | "
                     f"{statistics.fmean(r['wall_s'] for r in mine) / 60:.1f} min |")
    if teacher:
        lines.append(f"| teacher: SmolLM2-135M | | | {teacher['perplexity']:.2f} | {teacher['nll']:.3f} | |")
    by_seed: dict[int, dict[str, float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["mode"]] = r["heldout_nll"]
    gaps = [m["distilled"] - m["scratch"] for m in by_seed.values() if {"distilled", "scratch"} <= m.keys()]
    if gaps:
        lines.append("")
        lines.append(f"distilled - scratch, held-out nll per seed (same init, same tokens): "
                     f"{', '.join(f'{g:+.3f}' for g in gaps)}; mean {statistics.fmean(gaps):+.3f} ± "
                     f"{_spread(gaps):.3f} nats (perplexity x{math.exp(statistics.fmean(gaps)):.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=("scratch", "distilled"),
                        default=["scratch", "distilled"])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--steps", type=int, default=0, help="override the recipe's train.steps (0: keep)")
    parser.add_argument("--alpha", type=float, default=0.5, help="the distilled runs' alpha")
    parser.add_argument("--kind", choices=("forward", "reverse"), default="forward")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--heldout-windows", type=int, default=64, help="x the recipe's seq_len tokens")
    parser.add_argument("--shards", default=str(ROOT / "runs/shards/smollm2-pylib"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench-distill"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-teacher", action="store_true", help="do not score the teacher on held-out text")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = announce()
    ensure_shards(Path(args.shards))
    scored = None if args.no_teacher else score_teacher(args)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for mode in args.modes:
            rows.append(run_one(mode, seed, args))
            if args.json:  # after every run: a crash keeps what was measured
                Path(args.json).write_text(json.dumps({"machine": machine, "settings": vars(args),
                                                       "teacher": scored, "runs": rows}, indent=2))
    print(table(rows, scored))
    return 0


if __name__ == "__main__":
    sys.exit(main())
