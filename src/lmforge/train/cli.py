"""`lmforge pretrain --config configs/pretrain/NAME.yaml [--dotted.key=value ...]`.

Only argument parsing lives here, so that `lmforge --help` does not import torch; the
work is `lmforge.train.pretrain.pretrain`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.train.pretrain import PretrainConfig, pretrain

    config = load_config(PretrainConfig, args.config, args.overrides)
    summary = pretrain(config, quiet=args.quiet)
    if summary.get("rank"):  # under torchrun, rank 0 alone reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    bpb = f" ({summary['val_bpb']:.3f} bits/byte)" if "val_bpb" in summary else ""
    print(f"trained {summary['steps_this_run']} steps (to step {summary['steps']}) on "
          f"{summary['tokens_seen']:,} tokens in {summary['seconds']:.1f}s "
          f"({summary['tokens_per_s'] or 0:,.0f} tokens/s): final loss {summary['final_loss']:.4f}{val}{bpb}")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}\nplot: {summary['plot']}")
    return 0


class _DottedOverridesParser(argparse.ArgumentParser):
    """A parser that hands unknown `--section.key[=value]` (or `--key value`) arguments to the config.

    argparse cannot list every dotted key of the config in advance; the config loader
    checks them instead, and names any unknown key in its error.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, rest = super().parse_known_args(args, namespace)
        overrides: list[str] = list(getattr(namespace, "overrides", None) or [])
        unknown: list[str] = []
        i = 0
        while i < len(rest):
            item = rest[i]
            if item.startswith("--") and len(item) > 2:
                overrides.append(item)
                if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                    overrides.append(rest[i + 1])
                    i += 1
            else:
                unknown.append(item)
            i += 1
        namespace.overrides = overrides
        return namespace, unknown


def register(sub: argparse._SubParsersAction) -> None:
    """Add `pretrain` to the `lmforge` subcommands."""
    default_class = sub._parser_class
    sub._parser_class = _DottedOverridesParser  # only for this subcommand, restored below
    try:
        p = sub.add_parser(
            "pretrain", help="pretrain a transformer on token shards (next-token prediction)",
            description="Pretrain a model from a YAML recipe (configs/pretrain/*.yaml); any key can be "
                        "overridden as --section.key=value, e.g. --train.steps=200. Rerunning into the same "
                        "output resumes from its newest checkpoint (resume: auto).")
    finally:
        sub._parser_class = default_class
    p.add_argument("--config", "-c", default=None, help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override (repeatable); --section.key=value works too")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_pretrain)
