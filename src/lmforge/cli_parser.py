"""The argument parser every `lmforge` command uses, so that all of them behave alike.

Each option's help ends with its default (unless the help already says it), and a
command's usage errors name the command. Conventions the commands share, checked by
tests/test_cli_conventions.py: `--model` for a model, `-t/--tokenizer`, `-o/--output`,
`-c/--config` with `--set KEY=VALUE`, `-q/--quiet`, `--json` where a script would read
the output, and `--threads` wherever PyTorch runs.
"""

from __future__ import annotations

import argparse
from typing import Any


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states it (options that
    collect repeated values start empty, and say so by being repeatable)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        silent = (argparse._StoreConstAction, argparse._HelpAction, argparse._VersionAction,
                  argparse._AppendAction)
        if ("default" in help_text or action.required or not action.option_strings
                or isinstance(action, silent)):
            return help_text
        if action.default is None or action.default == argparse.SUPPRESS:
            return f"{help_text} (default: none)".strip()
        return f"{help_text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


class ConfigParser(Parser):
    """A parser that hands unknown `--section.key[=value]` (or `--key value`) arguments to the config.

    argparse cannot list every dotted key of a config in advance; the config loader
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


def add_config_command(sub: argparse._SubParsersAction, name: str, *, config_help: str,
                       **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand driven by a typed YAML config: `-c/--config FILE`, `--set KEY=VALUE` (repeatable)
    and `--section.key=value`, in that order of precedence (later wins)."""
    default_class = sub._parser_class
    sub._parser_class = ConfigParser  # only for this subcommand, restored below
    try:
        p = sub.add_parser(name, **kwargs)
    finally:
        sub._parser_class = default_class
    p.add_argument("--config", "-c", default=None, metavar="FILE", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); --section.key=value works too")
    return p


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch CPU threads (default: PyTorch's choice, usually the cores)")


def apply_threads(threads: int | None) -> None:
    """`--threads N`: set PyTorch's intra-op threads before any work starts."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
