"""`lmforge pretrain --config configs/pretrain/NAME.yaml [--dotted.key=value ...]`.

Only argument parsing lives here, so that `lmforge --help` does not import torch; the
work is `lmforge.train.pretrain.pretrain`.
"""

from __future__ import annotations

import argparse
import json

from lmforge.cli_parser import add_config_command, add_threads_flag, apply_threads


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.eval.probe import probe_for
    from lmforge.train.pretrain import PretrainConfig, pretrain

    apply_threads(args.threads)
    overrides = [*args.overrides, *([f"output={args.output}"] if args.output else [])]
    config = load_config(PretrainConfig, args.config, overrides)
    summary = pretrain(config, quiet=args.quiet, probe=probe_for(config.train, seed=config.seed))
    if summary.get("rank"):  # under torchrun, rank 0 alone reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    bpb = f" ({summary['val_bpb']:.3f} bits/byte)" if "val_bpb" in summary else ""
    if not summary["steps_this_run"]:
        print(f"nothing to do: the run is already at step {summary['steps']} (final loss "
              f"{summary['final_loss']:.4f}{val}{bpb}); raise --train.steps to train further")
    else:
        this_run = summary["steps_this_run"] * config.train.batch_tokens
        total = f", {summary['tokens_seen']:,} in all" if summary["tokens_seen"] != this_run else ""
        print(f"trained {summary['steps_this_run']} steps (to step {summary['steps']}) on {this_run:,} tokens"
              f"{total} in {summary['seconds']:.1f}s ({summary['tokens_per_s'] or 0:,.0f} tokens/s): "
              f"final loss {summary['final_loss']:.4f}{val}{bpb}")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}\nplot: {summary['plot']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `pretrain` to the `lmforge` subcommands."""
    p = add_config_command(
        sub, "pretrain", config_help="YAML recipe, e.g. configs/pretrain/tiny-cpu.yaml",
        help="pretrain a transformer on token shards (next-token prediction)",
        description="Pretrain a model from a YAML recipe (configs/pretrain/*.yaml); any key can be "
                    "overridden as --section.key=value, e.g. --train.steps=200. Rerunning into the same "
                    "output resumes from its newest checkpoint (resume: auto).")
    p.add_argument("--output", "-o", default=None,
                   help="run folder (default: the recipe's output key)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    add_threads_flag(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_pretrain)
