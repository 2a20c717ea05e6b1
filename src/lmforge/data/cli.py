"""The data verbs of the `lmforge` command: ``prepare`` and ``data samples``.

`register` adds them to the main parser's subcommands; each handler takes the parsed
arguments and returns an exit code. Progress goes to stderr (so stdout stays clean for
the summary table or, with ``--json``, the report).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from lmforge.cli_parser import add_config_command
from lmforge.data.executors import Executor, make_executor
from lmforge.data.pipeline import PrepareConfig, ProgressEvent, prepare
from lmforge.data.report import render_table

DEFAULT_RECIPE = "configs/data/fineweb.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``prepare`` and ``tokenize`` to the `lmforge` subcommands."""
    p = add_config_command(
        sub, "prepare",
        config_help="YAML recipe, e.g. configs/data/fineweb.yaml (default: FineWeb's settings)",
        help="crawl output / WARC / HTML / text -> clean, deduplicated documents",
        description="Extract, filter, deduplicate and scrub documents into Parquet or JSONL shards "
                    "(FineWeb's recipe by default). Rerun the same command to resume; override any recipe "
                    "key with --set language.languages=[en,fr] or --language.languages=[en,fr].")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files or folders (WARC/ARC, HTML, text, reST, JSONL, Parquet), or a data "
                        "sample name such as 'web' (see `lmforge data samples`)")
    p.add_argument("--output", "-o", required=True, help="output folder (resumed if it holds the same run)")
    p.add_argument("--workers", "-j", type=int, help="local worker processes (default: the config's, 1)")
    _executor_flags(p)
    p.add_argument("--format", choices=["parquet", "jsonl"], help="output format (default: parquet)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous run in --output and start over")
    p.add_argument("--json", action="store_true", help="print the run report as JSON instead of a table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("tokenize", help="documents -> token shards (train/val) for pretraining",
                       description="Encode documents (prepare's Parquet/JSONL output, or text, HTML, ...) "
                                   "into flat uint16/uint32 token shards with a document index, BOS/EOS "
                                   "at document boundaries, and a train/validation split by id hash.")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders of documents")
    t.add_argument("--tokenizer", "-t", required=True,
                   help="tokenizer folder, checkpoint or run folder, .gguf file, or a sample name (smollm2)")
    t.add_argument("--output", "-o", required=True, help="output folder for the shards and meta.json")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="share of documents held out for validation (default: 0.005)")
    t.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default: 100M)")
    t.add_argument("--workers", "-j", type=int, default=1, help="local worker processes (default: 1)")
    _executor_flags(t)
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    t.set_defaults(func=cmd_tokenize)



def _executor_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="where tasks run: local processes (default) or a Ray cluster "
                             "(needs pip install 'lmforge[ray]')")
    parser.add_argument("--address", default="auto",
                        help="with --executor ray: the cluster, as ray.init takes it: auto (default: the "
                             "cluster `ray start` made here, or $RAY_ADDRESS), HOST:PORT, ray://HOST:PORT, "
                             "or local (a private Ray on this machine)")


def _executor(args: argparse.Namespace, workers: int) -> Executor:
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    return make_executor(args.executor, workers=workers, address=args.address)


def load_prepare_config(path: str | None, overrides: list[str]) -> PrepareConfig:
    from lmforge.config import load_config

    return load_config(PrepareConfig, path, overrides)


def resolve_inputs(inputs: list[str], err: TextIO) -> list[str]:
    """Paths stay paths; a name that is no path but a data sample is fetched and used."""
    from lmforge.data.samples import DATA_SAMPLES, fetch_data_sample

    resolved = []
    for item in inputs:
        name = item.removeprefix("sample:")
        if not Path(item).exists() and (name in DATA_SAMPLES or name == "web"):
            path = fetch_data_sample(name)
            print(f"lmforge prepare: using sample {name!r} at {path}", file=err)
            resolved.append(str(path))
        else:
            resolved.append(item)
    return resolved


class ProgressPrinter:
    """Turns pipeline events into one status line per finished shard, on stderr."""

    def __init__(self, stream: TextIO, total_bytes: int) -> None:
        self.stream = stream
        self.total_bytes = total_bytes

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "phase_start":
            note = f" ({event.done} of {event.total} shards already done)" if event.done else ""
            print(f"[{event.phase}] starting{note}", file=self.stream, flush=True)
            return
        if event.kind == "phase_end":
            print(f"[{event.phase}] done in {event.elapsed:.1f}s", file=self.stream, flush=True)
            return
        if event.kind != "shard_done":
            return
        line = f"[{event.phase}] {event.unit} {event.done}/{event.total}"
        if event.elapsed > 0:
            line += f" · {event.docs:,} docs · {event.docs / event.elapsed:,.1f} docs/s"
            if event.bytes:
                rate = event.bytes / event.elapsed
                line += f" · {rate / 1e6:.2f} MB/s"
                left = max(0, self.total_bytes - event.bytes) if event.phase == "filter" else 0
                if left and rate > 0:
                    line += f" · ETA {time.strftime('%M:%S', time.gmtime(left / rate))}"
        print(line, file=self.stream, flush=True)


def cmd_prepare(args: argparse.Namespace) -> int:
    config = load_prepare_config(args.config, list(args.overrides))
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        config.workers = args.workers
    if args.format:
        config.output_format = args.format
    inputs = resolve_inputs(list(args.inputs), sys.stderr)
    from lmforge.data.readers import discover_inputs

    total = sum(f.size for f in discover_inputs(inputs, config.input_format, exclude=args.output))
    progress = None if args.quiet else ProgressPrinter(sys.stderr, total)
    with _executor(args, config.workers) as executor:
        report = prepare(inputs, args.output, config, overwrite=args.overwrite, progress=progress,
                         executor=executor)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_table(report))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from lmforge.data.shards import TokenizeConfig
    from lmforge.data.tokenize_tasks import tokenize_files
    from lmforge.hub import resolve_model_path

    config = TokenizeConfig()
    if args.val_fraction is not None:
        config.val_fraction = args.val_fraction
    if args.shard_tokens is not None:
        config.shard_tokens = args.shard_tokens
    config.validate()
    tokenizer_path = resolve_model_path(args.tokenizer)  # a SampleError is an OSError: one line
    inputs = resolve_inputs(list(args.inputs), sys.stderr)

    def progress(docs: int, tokens: int, elapsed: float) -> None:
        rate = tokens / elapsed if elapsed > 0 else 0.0
        print(f"\rtokenize: {docs:,} docs · {tokens:,} tokens · {rate:,.0f} tokens/s",
              end="", file=sys.stderr, flush=True)

    with _executor(args, args.workers) as executor:
        report = tokenize_files(inputs, tokenizer_path, args.output, config, executor=executor,
                                tokenizer_name=str(args.tokenizer), progress=None if args.quiet else progress)
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_table())
    return 0
