"""The `lmforge` command: one verb per stage, each a thin call into the library.

Errors that are the user's to fix (a missing file, a bad flag value, a corrupt
checkpoint) print one clear line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

# Exceptions that mean "bad input", not "bug": each module defines its own.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, PermissionError, OSError)


def _add_sampling_flags(parser: argparse.ArgumentParser, *, default_temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=default_temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _sampling_params(args: argparse.Namespace):
    from lmforge.infer.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _load(args: argparse.Namespace):
    import torch

    from lmforge.infer.loading import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)


# ---------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.infer.generate import GenerationStats, generate

    params = _sampling_params(args)
    loaded = _load(args)
    tok = loaded.tokenizer
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = args.prompt
    prompt_ids = tok.encode(prompt)
    stats = GenerationStats()
    pieces: list[str] = []
    for event in generate(loaded.model, prompt_ids, max_new_tokens=args.max_new_tokens, params=params,
                          stop_ids=loaded.stop_ids(), token_bytes=tok.token_bytes, stats=stats):
        pieces.append(event.text)
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({
            "completion": "".join(pieces), "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens, "finish_reason": stats.finish_reason,
            "prefill_seconds": round(stats.prefill_seconds, 4),
            "decode_tokens_per_second": round(stats.decode_tokens_per_second, 2),
        }))
    else:
        sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------- chat
CHAT_HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) leaves"


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.infer.generate import GenerationError, GenerationStats, generate

    params = _sampling_params(args)
    started = time.perf_counter()
    loaded = _load(args)
    tok = loaded.tokenizer
    interactive = sys.stdin.isatty()
    config = loaded.model.config
    print(f"lmforge chat: {loaded.path.name} ({config.num_parameters() / 1e6:.0f}M parameters, "
          f"loaded in {time.perf_counter() - started:.1f}s). {CHAT_HELP}", file=sys.stderr)
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
        prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        stats = GenerationStats()
        reply: list[str] = []
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            for event in generate(loaded.model, prompt_ids, max_new_tokens=args.max_new_tokens, params=params,
                                  stop_ids=loaded.stop_ids(), token_bytes=tok.token_bytes, stats=stats):
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

    if not args.path and not args.preset:
        raise ValueError("give a PATH (checkpoint folder, .gguf, or sample name) or --preset NAME")
    info = describe(f"preset:{args.preset}" if args.preset else args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("generate", cmd_generate, "continue a prompt and print only the completion")
    p.add_argument("--model", required=True, help="checkpoint folder, .gguf file, or a sample name (smollm2)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print the completion and timings as JSON")
    _add_sampling_flags(p, default_temperature=0.0)

    p = command("chat", cmd_chat, "a streaming terminal chat using the model's chat template")
    p.add_argument("--model", default="smollm2", help="checkpoint folder, .gguf file, or a sample name")
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_flags(p, default_temperature=0.7)

    p = command("info", cmd_info, "architecture, parameters, dtype, context length, tokenizer and size")
    p.add_argument("path", nargs="?", help="checkpoint folder, .gguf file, or a sample name")
    p.add_argument("--preset", help="describe a built-in architecture instead (gpt2, llama-tiny, ...)")
    p.add_argument("--json", action="store_true")

    from lmforge.data.cli import register as register_data
    from lmforge.data.crawl import register as register_crawl
    from lmforge.tokenizer.cli import register as register_tokenizer
    from lmforge.train.cli import register as register_pretrain

    register_crawl(sub)
    register_data(sub)
    register_tokenizer(sub)
    register_pretrain(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lmforge info x | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
