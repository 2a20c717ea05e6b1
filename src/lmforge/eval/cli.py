"""`lmforge eval` and `lmforge eval compare`: argument parsing, progress and the results files.

    lmforge eval --model M [--adapter DIR] --task mmlu,perplexity [--shots K] [--limit N]
                 [--data FILE...] [--json] [-o OUT]
    lmforge eval compare OUT1 OUT2 ... [-o PLOT.png] [--json]

OUT receives `results.json` (every task's metrics, breakdown, settings and per-item
records) and `results.md` (the same as tables), both written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.cli_parser import add_threads_flag, apply_threads

MODEL_HELP = "checkpoint folder, run folder, quantized folder, .gguf file, or a sample name (smollm2)"


class _Progress:
    """One self-overwriting line on stderr per task: done/total, rate and ETA."""

    def __init__(self, task: str, quiet: bool) -> None:
        self.task, self.quiet, self.started, self.shown = task, quiet, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.quiet or (now - self.shown < 0.5 and done < total):
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        end = "\n" if done >= total else ""
        print(f"\r{self.task}: {done}/{total} ({rate:.1f}/s, ETA {eta:.0f} s)   ", end=end, file=sys.stderr,
              flush=True)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """The results file as markdown: one headline table, then each task's breakdown."""
    lines = [f"# lmforge eval: {results['model']}", "", "| task | metric | value |", "|---|---|---|"]
    for name, task in results["tasks"].items():
        lines += [f"| {name} | {metric} | {_format(value)} |" for metric, value in task["metrics"].items()]
    for name, task in results["tasks"].items():
        if not task["breakdown"]:
            continue
        columns = list(next(iter(task["breakdown"].values())))
        lines += ["", f"## {name}", "", "| | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {group} | " + " | ".join(_format(row.get(c, "")) for c in columns) + " |"
                  for group, row in task["breakdown"].items()]
    return "\n".join(lines) + "\n"


def task_option_values(items: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """`--option [TASK.]KEY=VALUE` -> {task: {key: value}}; values read as YAML scalars (true, 3, 0.8, de).
    Without TASK the option goes to every task asked for."""
    import yaml

    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: give KEY=VALUE or TASK.KEY=VALUE")
        task, dot, key = key.rpartition(".")
        if dot and task not in options:
            raise ValueError(f"--option {item!r}: {task!r} is not among the tasks asked for "
                             f"({', '.join(names)})")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        for name in [task] if dot else names:
            options[name][key] = value
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "compare":
        return cmd_compare(args)
    import torch

    from lmforge.eval.lm import EvalModel
    from lmforge.eval.tasks import make_task
    from lmforge.tune.apply import adapter_step

    if args.model is None or args.task is None:
        raise ValueError("--model and --task are required (or `lmforge eval compare RUN...`)")
    apply_threads(args.threads)
    names = [n.strip() for n in args.task.split(",") if n.strip()]
    options = task_option_values(args.option, names)
    # unknown names and options fail before the model loads
    tasks = {name: make_task(name, args.data, **options[name]) for name in names}
    model = EvalModel.load(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                           quantize=args.quantize, prepare=adapter_step(args.adapter),
                           max_length=args.max_length, batch_tokens=args.batch_tokens)
    results: dict[str, Any] = {"model": args.model, "adapter": args.adapter, "path": model.name, "tasks": {}}
    for name, task in tasks.items():
        result = task.run(model, shots=args.shots, limit=args.limit, seed=args.seed,
                          progress=_Progress(name, args.quiet))
        results["tasks"][name] = result.to_json()
    if args.output:
        out = Path(args.output)
        with atomic_write(out / "results.json", "w") as f:
            json.dump(results, f, indent=1)
        with atomic_write(out / "results.md", "w") as f:
            f.write(markdown(results))
    if args.json:
        print(json.dumps({name: task["metrics"] for name, task in results["tasks"].items()}))
    else:
        for name, task in results["tasks"].items():
            info = task["info"]
            print(f"{name} ({info.get('seconds', 0):.1f} s): " +
                  ", ".join(f"{k} {_format(v)}" for k, v in task["metrics"].items()))
        if args.output:
            print(f"results: {Path(args.output) / 'results.json'}, {Path(args.output) / 'results.md'}")
    return 0


def _read_run(path: Path) -> dict[str, Any]:
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
        return {name: task["metrics"] for name, task in results["tasks"].items()}
    except FileNotFoundError:
        raise ValueError(f"{path}: no results.json (give `lmforge eval -o` folders)") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{file}: not an `lmforge eval` results file") from None


def cmd_compare(args: argparse.Namespace) -> int:
    runs = {str(p): _read_run(Path(p)) for p in args.runs}
    rows = sorted({(task, metric) for metrics in runs.values() for task, values in metrics.items()
                   for metric in values})
    table = {f"{task}/{metric}": {run: metrics.get(task, {}).get(metric) for run, metrics in runs.items()}
             for task, metric in rows}
    if args.output:
        _plot(table, Path(args.output))
    if args.json:
        print(json.dumps(table))
        return 0
    names = list(runs)
    print("| metric | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for metric, values in table.items():
        cells = ["" if values[n] is None else _format(values[n]) for n in names]
        print(f"| {metric} | " + " | ".join(cells) + " |")
    if args.output:
        print(f"plot: {args.output}")
    return 0


def _plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    """One bar chart per metric, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m, values in table.items() if any(isinstance(v, (int, float)) for v in values.values())]
    if not metrics:
        raise ValueError("the runs have no numeric metric to plot")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        runs = list(table[metric])
        ax.barh([Path(r).name or r for r in runs], [table[metric][r] or 0 for r in runs], color="tab:blue")
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` (and `eval compare`) to the `lmforge` subcommands."""
    from lmforge.eval.tasks import REGISTRY

    tasks = "; ".join(f"{info.name}: {info.description}" for info in REGISTRY.values())
    p = sub.add_parser("eval", help="score a model: perplexity, MMLU, ... (lm-eval's prompts, conventions)",
                       description=f"Score a model on one or more tasks. Tasks: {tasks}.")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a fine-tuned adapter on the model (lmforge finetune OUTPUT/adapter, a PEFT folder)")
    p.add_argument("--task", default=None, help="task names, comma-separated (mmlu,perplexity)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples a prompt (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="a seeded sample of N items (default: all)")
    p.add_argument("--seed", type=int, default=0, help="draws the --limit sample and any sampling")
    p.add_argument("--option", action="append", default=[], metavar="[TASK.]KEY=VALUE",
                   help="a task's own setting, e.g. hotpotqa.distractors=true, mmath.lang=de, "
                        "humaneval.samples=5 (repeatable; without TASK: every task asked for)")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help="the task's data instead of the packaged sample (default: none, the packaged data)")
    p.add_argument("--output", "-o", default=None, help="folder for results.json and results.md")
    p.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights' number format")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers")
    p.add_argument("--max-length", type=int, default=None,
                   help="context window scored in (default: the model's context)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per scoring forward pass")
    add_threads_flag(p)
    p.set_defaults(func=cmd_eval, eval_command=None)
    verbs = p.add_subparsers(dest="eval_command", required=False, metavar="compare")
    c = verbs.add_parser("compare", help="tabulate and plot several `lmforge eval -o` runs",
                         description="A table of every metric of several runs side by side (e.g. base, SFT, "
                                     "DPO, GPTQ), and with -o a PNG bar chart per metric.")
    c.add_argument("runs", nargs="+", metavar="RUN", help="`lmforge eval -o` folders (or their results.json)")
    c.add_argument("--output", "-o", default=None, help="write the plot to this PNG file")
    c.add_argument("--json", action="store_true", help="print {metric: {run: value}} as JSON")
    c.set_defaults(func=cmd_eval)
