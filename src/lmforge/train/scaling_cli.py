"""`lmforge scaling plan | sweep | fit`: argument parsing only (torch is imported by the work).

The work is in `lmforge.train.scaling`; this module stays light so that `lmforge --help`
starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _amount(text: str) -> float:
    """'1e18', '135M', '2.5B' -> a float (argparse turns the ValueError into a usage error)."""
    text = text.strip().replace("_", "")
    if text and text[-1].lower() in _SUFFIXES:
        return float(text[:-1]) * _SUFFIXES[text[-1].lower()]
    return float(text)


def cmd_plan(args: argparse.Namespace) -> int:
    from lmforge.train.scaling import format_plan, plan

    rows = plan(compute=args.compute, params=args.params, tokens=args.tokens,
                tokens_per_param=args.tokens_per_param)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_plan(rows))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.train.pretrain import PretrainConfig
    from lmforge.train.scaling import format_sweep_plan, parse_sizes, parse_tokens, plan_sweep, sweep

    base = load_config(PretrainConfig, args.config, args.overrides)
    sizes, budgets = parse_sizes(args.sizes), parse_tokens(args.tokens)
    if args.dry_run:
        print(format_sweep_plan(plan_sweep(base, sizes, budgets, args.output, max_flops=args.max_flops,
                                           lr_scale=args.lr_scale)))
        return 0
    records = sweep(base, sizes, budgets, args.output, max_flops=args.max_flops, lr_scale=args.lr_scale,
                    threads=args.threads, quiet=args.quiet)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{len(records)} runs: {args.output}/results.jsonl and results.csv; "
              f"fit them with `lmforge scaling fit {args.output}`")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.train.scaling import fit_results, format_fit, plot_fit, read_results

    records = read_results(args.results)
    result, points = fit_results(records, params_kind=args.params, delta=args.delta, refine=args.refine)
    plot = None
    if not args.no_plot:
        target = args.plot or (Path(args.results) if Path(args.results).is_dir()
                               else Path(args.results).parent) / "scaling.png"
        plot = plot_fit(result, points, target)
        if plot is None:
            print("note: matplotlib is not installed; no plot written", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict() | {"plot": str(plot) if plot else None}, indent=2))
    else:
        print(format_fit(result, points))
        if plot:
            print(f"plot: {plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `scaling` (plan, sweep, fit) to the `lmforge` subcommands."""
    from lmforge.cli_parser import add_config_command, add_threads_flag

    p = sub.add_parser("scaling", help="scaling laws: plan a compute budget, sweep small runs, fit L(N, D)",
                       description="Chinchilla-style scaling laws: C = 6ND, "
                                   "L(N, D) = E + A/N^alpha + B/D^beta.")
    verbs = p.add_subparsers(dest="scaling_command", required=True, metavar="VERB")

    plan = verbs.add_parser("plan", help="compute-optimal params and tokens for a budget",
                            description="Compute-optimal model size N and tokens D for a budget, from the "
                                        "published Chinchilla fit and from the ~20 tokens/parameter rule. "
                                        "Numbers take K/M/B/T suffixes (135M).")
    plan.add_argument("--compute", type=_amount, help="training FLOPs (C = 6ND), e.g. 1e18")
    plan.add_argument("--params", type=_amount, help="model parameters N, e.g. 135M")
    plan.add_argument("--tokens", type=_amount, help="training tokens D, e.g. 2T")
    plan.add_argument("--tokens-per-param", type=float, default=20.0, help="the rule of thumb's ratio (20)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    sweep = add_config_command(
        verbs, "sweep", config_help="base pretraining recipe (YAML; required)",
        help="pretrain a grid of model sizes x token budgets and record their losses",
        description="Run small pretraining runs, one per (size, token budget), each in OUTPUT/runs/NAME; "
                    "finished runs are skipped and interrupted ones resume, so rerunning continues the "
                    "sweep. Writes OUTPUT/results.jsonl and results.csv. Any recipe key can be "
                    "overridden: --data.folder=..., --train.seq_len=128.")
    sweep.add_argument("--sizes", required=True,
                       help="model sizes as D_MODELxN_LAYERS, comma separated (64x2,128x4); heads, KV heads "
                            "and d_ff follow the recipe's head size and ratios")
    sweep.add_argument("--tokens", required=True, help="token budgets, comma separated (2e5,500K,1M)")
    sweep.add_argument("--output", "-o", default="runs/scaling", help="sweep folder (runs/scaling)")
    sweep.add_argument("--max-flops", type=_amount, default=None,
                       help="leave out grid points costing more training FLOPs than this (e.g. 1.5e12)")
    sweep.add_argument("--lr-scale", choices=["width", "none"], default="width",
                       help="width: each size gets optim.lr x d_model(recipe) / d_model (muP for Adam); "
                            "none: the recipe's lr for every size")
    add_threads_flag(sweep)
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the runs (params, tokens, FLOPs) and stop")
    sweep.add_argument("--quiet", "-q", action="store_true", help="no per-run progress on stderr")
    sweep.add_argument("--json", action="store_true", help="print the records as JSON")
    sweep.set_defaults(func=cmd_sweep)

    fit = verbs.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to sweep results and plot it",
                           description="Fit the Chinchilla loss law to a sweep's results (Huber loss on "
                                       "log L, L-BFGS from a grid of initialisations), print the constants "
                                       "next to the published ones and write a plot.")
    fit.add_argument("results", help="a sweep folder, or its results.jsonl / results.csv")
    fit.add_argument("--params", choices=["non_embedding", "total"], default="non_embedding",
                     help="which parameter count is N (non_embedding: the default, as Kaplan et al.)")
    fit.add_argument("--plot", default=None, help="PNG path (default: scaling.png beside the results)")
    fit.add_argument("--no-plot", action="store_true")
    fit.add_argument("--delta", type=float, default=1e-3,
                     help="Huber delta on log L (1e-3, as Hoffmann et al.)")
    fit.add_argument("--refine", type=int, default=64, help="grid starts polished by L-BFGS (64)")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(func=cmd_fit)
