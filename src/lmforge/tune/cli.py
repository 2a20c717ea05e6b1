"""`lmforge finetune --model M --data FILE_OR_SAMPLE --method lora -o OUT [-c RECIPE] [--key=value ...]`.

Only argument parsing lives here (so `lmforge --help` does not import torch); the work
is `lmforge.tune.finetune.finetune`.
"""

from __future__ import annotations

import argparse
import json

from lmforge.cli_parser import add_config_command, add_threads_flag, apply_threads

METHODS = ("full", "lora", "qlora", "ia3", "prefix", "adapter")


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.eval.probe import probe_for
    from lmforge.tune.finetune import FinetuneConfig, finetune

    apply_threads(args.threads)
    flags = {"model": args.model, "data.source": args.data, "method": args.method, "output": args.output,
             "merge": True if args.merge else None}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    config = load_config(FinetuneConfig, args.config, overrides)
    summary = finetune(config, quiet=args.quiet, probe=probe_for(config.train, seed=config.seed))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    val = f", held-out loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
    print(f"fine-tuned ({summary['method']}, {summary['trainable_parameters']:,} trainable parameters) "
          f"for {summary['steps_this_run']} steps (to step {summary['steps']}) in "
          f"{summary.get('seconds', 0):.1f}s: final loss {summary['final_loss']:.4f}{val}; peak memory "
          f"{summary['peak_rss_mb']:,.0f} MB")
    for key in ("adapter", "model", "merged"):
        if summary.get(key):
            print(f"{key}: {summary[key]}")
    print(f"metrics: {summary['metrics']}\nplot: {summary['plot']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `finetune` to the `lmforge` subcommands."""
    p = add_config_command(
        sub, "finetune", config_help="YAML recipe, e.g. configs/finetune/smollm2-lora.yaml",
        help="supervised fine-tuning on conversations: full, LoRA, QLoRA, (IA)^3, prefix tuning or "
             "bottleneck adapters (in PEFT's format)",
        description="Fine-tune a model on chat data with the loss on the assistant's replies only. Any "
                    "recipe key can be overridden as --section.key=value (--lora.r=8, --train.steps=200). "
                    "Rerunning into the same output resumes from its newest checkpoint.")
    p.add_argument("--model", default=None,
                   help="base model: checkpoint or run folder, .gguf file, or a sample name (default: the "
                        "recipe's)")
    p.add_argument("--data", default=None,
                   help="conversations: a JSONL/JSON file (messages, instruction/input/output, prompt/"
                        "completion or ShareGPT rows) or a sample: chitchat, squad, hotpotqa, identity, "
                        "mtbench (default: the recipe's)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="what trains (default: the recipe's, lora)")
    p.add_argument("--output", "-o", default=None, help="run folder (default: the recipe's, runs/finetune)")
    p.add_argument("--merge", action="store_true",
                   help="also write OUTPUT/merged: base + adapter as one model")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_threads_flag(p)
    p.set_defaults(func=cmd_finetune)
