"""`lmforge demo`: from raw web pages and text to a model that writes, one stage at a time.

The demo is the curriculum in one command, on data that ships with lmforge's samples:

1. **prepare (web)** — real HTML pages and WARC records, cleaned with FineWeb's recipe:
   text extraction, language ID, Gopher/C4/FineWeb quality filters, deduplication, PII;
2. **prepare (text)** — the Python documentation's reST sources, with the same language
   ID, deduplication and PII scrubbing but without the web-prose quality filters
   (reference docs are full of code and short lines, which those filters drop on purpose);
3. **tokenizer** — a byte-level BPE vocabulary learned from both;
4. **tokenize** — documents to token shards, with a held-out validation split;
5. **pretrain** — a small llama-style transformer, next-token prediction;
6. **sample** — text from the trained model, through the inference engine;

and then serves the new model next to SmolLM2 (`lmforge serve`), so the playground page
can put the two side by side on one prompt.

Every stage writes into one folder (`runs/demo`) and a rerun reuses what is finished,
so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lmforge.cli_parser import add_threads_flag, apply_threads

#: The model and training recipe: the tiny-cpu recipe (configs/pretrain/tiny-cpu.yaml),
#: which learns visibly on a 2-core laptop CPU in minutes.
DEMO_RECIPE: dict[str, Any] = {
    "model": {"preset": "llama-tiny", "d_model": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2,
              "d_ff": 512, "max_seq_len": 256},
    "optim": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95},
    "schedule": {"kind": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1},
    "train": {"batch_tokens": 4096, "micro_batch": 16, "seq_len": 256, "grad_clip": 1.0, "precision": "fp32",
              "eval_interval": 100, "eval_batches": 8, "checkpoint_interval": 100, "keep_checkpoints": 2,
              "log_interval": 10, "peak_flops": "measure"},
}
DEMO_PROMPTS = ("The Python interpreter", "To install a package on Debian,", "A list comprehension")


@dataclass
class DemoConfig:
    output: Path = Path("runs/demo")
    pages: list[str] = field(default_factory=lambda: ["web"])  # paths or data sample names
    text: list[str] | None = None  # None: the Python docs' reST sources
    vocab_size: int = 4096
    steps: int = 600
    prompts: Sequence[str] = DEMO_PROMPTS
    max_new_tokens: int = 60
    seed: int = 1337


class DemoReporter:
    """Prints the stage headers and what each stage did, in words, on `stream`."""

    def __init__(self, stream: TextIO, total_stages: int) -> None:
        self.stream, self.total, self.index, self.started = stream, total_stages, 0, time.perf_counter()

    def stage(self, title: str, why: str) -> None:
        self.index += 1
        print(f"\n[{self.index}/{self.total}] {title}\n      {why}", file=self.stream, flush=True)

    def result(self, *lines: str) -> None:
        for line in lines:
            print(f"   -> {line}", file=self.stream, flush=True)

    def elapsed(self) -> str:
        seconds = time.perf_counter() - self.started
        return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _drops(report: Any, limit: int = 3) -> str:
    """The stages that dropped most documents, with their counts: 'language 147, c4 51'."""
    stages = sorted((s for s in report.stages if s.dropped_total), key=lambda s: -s.dropped_total)
    return ", ".join(f"{s.name} {s.dropped_total}" for s in stages[:limit]) or "none"


def _prepare(inputs: list[str], output: Path, web_recipe: bool, quiet: bool) -> Any:
    from lmforge.data.cli import ProgressPrinter, resolve_inputs
    from lmforge.data.pipeline import PrepareConfig, prepare
    from lmforge.data.readers import discover_inputs

    config = PrepareConfig()  # FineWeb's recipe
    if not web_recipe:
        for section in (config.gopher_repetition, config.gopher_quality, config.c4, config.fineweb):
            section.enabled = False
    resolved = resolve_inputs(inputs, sys.stderr)
    total = sum(f.size for f in discover_inputs(resolved, config.input_format, exclude=output))
    progress = None if quiet else ProgressPrinter(sys.stderr, total)
    return prepare(resolved, output, config, progress=progress)


def _text_inputs(config: DemoConfig) -> list[str]:
    if config.text is not None:
        return list(config.text)
    from lmforge.data.samples import python_docs_dir

    return [str(python_docs_dir() / "_sources")]


def _train_tokenizer(folders: list[Path], output: Path, vocab_size: int, quiet: bool) -> Any:
    from lmforge.data.shards import read_documents_from
    from lmforge.tokenizer.cli import DEFAULT_SPECIAL_TOKENS
    from lmforge.tokenizer.tokenizer import load_tokenizer
    from lmforge.tokenizer.train import train_bpe

    if (output / "tokenizer.json").exists():
        return load_tokenizer(output), None
    texts = (doc.text for doc in read_documents_from([str(f) for f in folders]))
    model = train_bpe(texts, vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS, progress=not quiet, workers=1)
    tokenizer = model.to_tokenizer()
    tokenizer.save(output)
    return tokenizer, model


def _pretrain_config(config: DemoConfig, shards: Path, tokenizer_dir: Path, vocab_size: int) -> Any:
    from lmforge.config import build, merge
    from lmforge.train.pretrain import PretrainConfig

    recipe = merge(DEMO_RECIPE, {
        "model": {"vocab_size": vocab_size},
        "data": {"folder": str(shards), "tokenizer": str(tokenizer_dir)},
        "train": {"steps": config.steps},
        "output": str(config.output / "model"),
        "seed": config.seed,
    })
    return build(PretrainConfig, recipe)


def run_demo(config: DemoConfig, *, quiet: bool = False, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run every stage (reusing finished ones) and return a summary of what each produced."""
    from lmforge.data.shards import TokenizeConfig, read_documents_from, tokenize_documents
    from lmforge.train.pretrain import pretrain

    say = DemoReporter(out, total_stages=6)
    root = Path(config.output)
    summary: dict[str, Any] = {"output": str(root)}

    say.stage("prepare web pages", "extract the main text of real HTML pages and WARC records, keep "
                                   "English, drop low-quality and duplicate pages, scrub e-mails/IPs "
                                   "(FineWeb's recipe)")
    web = _prepare(config.pages, root / "documents" / "web", web_recipe=True, quiet=quiet)
    say.result(f"{web.docs_read} pages read, {web.docs_written} kept "
               f"({web.chars_written / 1e6:.2f} M characters)", f"dropped most by: {_drops(web)}")
    summary["web"] = {"read": web.docs_read, "kept": web.docs_written, "chars": web.chars_written}

    say.stage("prepare text", "the Python docs' reST sources: markup removed, language ID, deduplication and "
                              "PII scrubbing (no web-prose filters: docs are full of code on purpose)")
    text = _prepare(_text_inputs(config), root / "documents" / "text", web_recipe=False, quiet=quiet)
    say.result(f"{text.docs_read} documents read, {text.docs_written} kept "
               f"({text.chars_written / 1e6:.2f} M characters); dropped: {_drops(text)}")
    summary["text"] = {"read": text.docs_read, "kept": text.docs_written, "chars": text.chars_written}
    folders = [root / "documents" / "web", root / "documents" / "text"]

    say.stage("train a tokenizer", f"byte-level BPE: start from the 256 bytes, merge the most frequent pair "
                                   f"until there are {config.vocab_size:,} tokens")
    tokenizer_dir = root / "tokenizer"
    tokenizer, bpe = _train_tokenizer(folders, tokenizer_dir, config.vocab_size, quiet)
    example = "The interpreter reads a line of Python."
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(example)]
    say.result(f"{tokenizer.vocab_size:,} tokens" + (" (reused)" if bpe is None else
                                                     f" from {len(bpe.merges):,} merges"),
               f"{example!r} -> {len(pieces)} tokens: {' | '.join(pieces)}")
    summary["tokenizer"] = {"path": str(tokenizer_dir), "vocab_size": tokenizer.vocab_size}

    say.stage("tokenize", "every document becomes BOS + token ids + EOS in flat shards; 2% held out to "
                          "measure the model on text it never trained on")
    shards = root / "shards"
    if not (shards / "meta.json").exists():
        tokenize_documents(read_documents_from([str(f) for f in folders]), tokenizer, shards,
                           TokenizeConfig(val_fraction=0.02), tokenizer_name=str(tokenizer_dir))
    meta = json.loads((shards / "meta.json").read_text())
    splits = meta["splits"]
    val = splits.get("val", {})
    say.result(f"{splits['train']['tokens']:,} training tokens, {val.get('tokens', 0):,} validation tokens, "
               f"{val.get('bytes_per_token') or 0:.2f} bytes per token")
    summary["tokens"] = {name: split["tokens"] for name, split in splits.items()}

    recipe = _pretrain_config(config, shards, tokenizer_dir, tokenizer.vocab_size)
    tokens = recipe.train.steps * recipe.train.batch_tokens
    say.stage("pretrain", f"a {recipe.model['n_layers']}-layer llama-style transformer learns to predict the "
                          f"next token: {recipe.train.steps} steps x {recipe.train.batch_tokens:,} tokens = "
                          f"{tokens / 1e6:.1f} M tokens (progress on stderr)")
    trained = pretrain(recipe, quiet=quiet)
    val = f", validation loss {trained['val_loss']:.3f} ({trained['val_bpb']:.2f} bits/byte)" \
        if "val_loss" in trained else ""
    say.result(f"{trained['parameters']:,} parameters; loss {trained['final_loss']:.3f}{val}",
               f"checkpoint {trained['checkpoint']}; loss curve {trained['plot']}")
    summary["pretrain"] = {k: trained.get(k) for k in ("parameters", "final_loss", "val_loss", "val_bpb",
                                                        "checkpoint", "plot", "tokens_per_s")}

    say.stage("sample", "the engine feeds the prompt, then draws one token at a time "
                        "(temperature 0.8, top-k 40), reusing the KV cache")
    samples = sample(trained["checkpoint"], config.prompts, config.max_new_tokens, config.seed)
    for prompt, completion in samples.items():
        say.result(f"{prompt}\033[1m{completion}\033[0m" if out.isatty() else f"{prompt}{completion}")
    summary["samples"] = samples
    print(f"\ndone in {say.elapsed()}; everything is in {root}/", file=out, flush=True)
    return summary


def sample(checkpoint: str | Path, prompts: Sequence[str], max_new_tokens: int, seed: int) -> dict[str, str]:
    """One sampled continuation per prompt from the checkpoint, through the inference engine."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    engine = Engine.from_pretrained(str(checkpoint))
    params = SamplingParams(temperature=0.8, top_k=40, max_tokens=max_new_tokens, seed=seed)
    completions = engine.complete(list(prompts), params)  # all prompts in one continuous batch
    return {prompt: done.text for prompt, done in zip(prompts, completions)}


# ------------------------------------------------------------------------------ CLI
def cmd_demo(args: argparse.Namespace) -> int:
    config = DemoConfig(output=Path(args.output), steps=args.steps, vocab_size=args.vocab_size)
    if args.pages:
        config.pages = list(args.pages)
    if args.text:
        config.text = list(args.text)
    if config.steps < 1:
        raise ValueError("--steps must be at least 1")
    apply_threads(args.threads)
    summary = run_demo(config, quiet=args.quiet, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, indent=2), flush=True)
    if args.no_serve:
        return 0
    return serve_next_to_smollm2(summary["pretrain"]["checkpoint"], host=args.host, port=args.port)


def serve_next_to_smollm2(checkpoint: str, *, host: str, port: int) -> int:
    """Serve the trained model as `demo` beside SmolLM2 (until Ctrl-C): the playground shows
    both answering one prompt, token by token, with their probabilities."""
    from lmforge.serve.cli import add_arguments, cmd_serve

    parser = argparse.ArgumentParser(prog="lmforge demo")
    add_arguments(parser)
    args = parser.parse_args(["--model", f"demo={checkpoint}", "--model", "smollm2", "--host", host,
                              "--port", str(port), "--log-level", "warning"])
    print(f"\nserving: open http://{host}:{port}/ and press Compare to put 'demo' next to 'smollm2' "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    return cmd_serve(args)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `demo` to the `lmforge` subcommands."""
    p = sub.add_parser("demo", help="raw pages and text -> a trained model, every stage explained",
                       description="Prepare the sample web pages and text, train a tokenizer, tokenize, "
                                   "pretrain a small model and sample from it (about 15 minutes on a 2-core "
                                   "CPU), then serve it next to SmolLM2 with the playground. Rerunning "
                                   "reuses the finished stages.")
    p.add_argument("--output", "-o", default="runs/demo", help="folder for every stage's output")
    p.add_argument("--steps", type=int, default=DemoConfig.steps,
                   help="pretraining steps (4,096 tokens each)")
    p.add_argument("--vocab-size", type=int, default=DemoConfig.vocab_size, help="tokenizer vocabulary size")
    p.add_argument("--pages", nargs="+", metavar="INPUT",
                   help="raw pages to prepare (default: the 'web' sample)")
    p.add_argument("--text", nargs="+", metavar="INPUT",
                   help="text to add (default: the Python docs' reST sources)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (stages go to stderr)")
    p.add_argument("--no-serve", action="store_true",
                   help="stop after sampling instead of serving the model next to SmolLM2")
    p.add_argument("--host", default="127.0.0.1", help="where to serve at the end")
    p.add_argument("--port", type=int, default=8000, help="where to serve at the end")
    add_threads_flag(p)
    p.set_defaults(func=cmd_demo)
