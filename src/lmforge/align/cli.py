"""`lmforge align reward|dpo|kto|grpo|ppo --model M --data FILE_OR_TASK -o OUT [-c RECIPE] [--key=value ...]`.

Only argument parsing lives here (so `lmforge --help` does not import torch); the work
is `lmforge.align.run.align`.
"""

from __future__ import annotations

import argparse
import json

from lmforge.cli_parser import add_config_command, add_threads_flag, apply_threads

ALGORITHMS = ("reward", "dpo", "kto", "grpo", "ppo")


def cmd_align(args: argparse.Namespace) -> int:
    from lmforge.align.run import AlignConfig, align, describe
    from lmforge.config import load_config
    from lmforge.eval.probe import probe_for

    apply_threads(args.threads)
    flags = {"algorithm": args.algorithm, "model": args.model, "data.source": args.data,
             "method": args.method, "output": args.output}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    config = load_config(AlignConfig, args.config, overrides)
    summary = align(config, quiet=args.quiet, probe=probe_for(config.train, seed=config.seed))
    print(json.dumps(summary, indent=2) if args.json else describe(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `align` to the `lmforge` subcommands."""
    p = add_config_command(
        sub, "align", config_help="YAML recipe, e.g. configs/align/smollm2-grpo.yaml",
        help="alignment: a reward model, DPO (and IPO, SimPO, ORPO), KTO, or PPO/GRPO with rollouts on "
             "lmforge's engine",
        description="Align a model with preferences or a verifiable reward, through the same Trainer as "
                    "pretraining. Any recipe key can be overridden as --section.key=value (--dpo.beta=0.2, "
                    "--grpo.rollout.samples_per_prompt=8). Rerunning into the same output resumes from its "
                    "newest checkpoint.")
    p.add_argument("algorithm", choices=ALGORITHMS,
                   help="reward: a reward model on pairs; dpo: DPO family on pairs (--dpo.loss_type); "
                        "kto: labelled completions; grpo/ppo: rollouts rewarded by a task's checker or a "
                        "reward model")
    p.add_argument("--model", default=None,
                   help="the model to align: checkpoint or run folder, .gguf file, or a sample name "
                        "(default: the recipe's)")
    p.add_argument("--data", default=None,
                   help="reward/dpo/kto: a preference JSONL (prompt/chosen/rejected, or prompt/completion/"
                        "label) or a sample: champ-pairs, champ-transcripts, champ-kto; dpo also "
                        "onpolicy:TASK; grpo/ppo: a task: basic_arithmetic, chain_sum, gsm_symbolic")
    p.add_argument("--method", choices=("full", "lora"), default=None,
                   help="what of the policy trains (default: the recipe's, lora)")
    p.add_argument("--output", "-o", default=None, help="run folder (default: the recipe's, runs/align)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_threads_flag(p)
    p.set_defaults(func=cmd_align)
