"""Does alignment change what the model gets right? GRPO and on-policy DPO on SmolLM2, several seeds.

Each run is `lmforge align` with a recipe from configs/align (the same as the CLI), into
its own folder, one after the other in this process. For each it records held-out pass@1
before and after (greedy, on problems of the task's test split: never sampled, never
trained on), the wall time, and the CPU time; then prints a table with the mean and the
spread over seeds and the gain per CPU-hour. The "before" is the same model and problems
for every seed (the held-out problems do not depend on the training seed), so the "before"
column is one number per recipe, measured again by every run as a check.

    python benchmarks/bench_align_learning.py --algorithms grpo dpo --seeds 0 1 2 --json align.json
    python benchmarks/bench_align_learning.py --algorithms grpo --seeds 0 --steps 2 --eval-problems 8  # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from anchors import require
from machine import announce

from lmforge.align.run import AlignConfig, align
from lmforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"grpo": ROOT / "configs/align/smollm2-grpo.yaml", "ppo": ROOT / "configs/align/smollm2-ppo.yaml",
           "dpo": ROOT / "configs/align/smollm2-dpo-onpolicy.yaml"}
ANCHORS = ("reasoning_gym",)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(algorithm: str, seed: int, args: argparse.Namespace) -> dict:
    overrides = [f"seed={seed}", f"output={args.out}/{algorithm}-seed{seed}", "resume=never",
                 f"data.eval_problems={args.eval_problems}"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(AlignConfig, RECIPES[algorithm], overrides)
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = align(config, quiet=args.quiet)
    row = {"algorithm": algorithm, "seed": seed, "steps": summary["steps"],
           "pass_at_1_before": summary["pass_at_1_before"],
           "pass_at_1_after": summary["pass_at_1_after"], "wall_s": time.perf_counter() - started,
           "cpu_s": cpu_seconds() - cpu, "final_loss": summary["final_loss"]}
    for key in ("onpolicy_pairs", "onpolicy_sampled_accuracy", "onpolicy_problems"):
        if key in summary:
            row[key] = summary[key]
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| algorithm | seeds | steps | held-out pass@1 before | after: mean ± sd (each seed) | gain | "
             "wall per run | gain per CPU-hour |", "|---|---|---|---|---|---|---|---|"]
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        after = [r["pass_at_1_after"] for r in mine]
        before = statistics.fmean(r["pass_at_1_before"] for r in mine)
        spread = statistics.stdev(after) if len(after) > 1 else 0.0
        mean = statistics.fmean(after)
        cpu_hours = statistics.fmean(r["cpu_s"] for r in mine) / 3600
        wall = statistics.fmean(r["wall_s"] for r in mine)
        each = ", ".join(f"{a:.3f}" for a in after)
        gain = mean - before
        lines.append(f"| {algorithm} | {len(mine)} | {mine[0]['steps']} | {before:.3f} | "
                     f"{mean:.3f} ± {spread:.3f} ({each}) | {gain:+.3f} | {wall / 60:.1f} min | "
                     f"{gain / cpu_hours:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", choices=sorted(RECIPES), default=["grpo", "dpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=0, help="override the recipes' train.steps (0: keep)")
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--out", default="runs/bench-align")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    require(*ANCHORS)
    machine = announce(ANCHORS)
    rows = [run_one(algorithm, seed, args) for algorithm in args.algorithms for seed in args.seeds]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
