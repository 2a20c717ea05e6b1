"""`lmforge serve`: load one or more models and serve them over OpenAI's HTTP API.

    lmforge serve --model smollm2
    lmforge serve --model tiny=runs/tiny-cpu --model smollm2 --api-key secret --port 8080
    lmforge serve --model smollm2 --adapter identity=runs/smollm2-lora/adapter
    lmforge serve --model smollm2 --model minilm --rag-index docs=runs/docs-index

`register(sub)` adds the verb to the `lmforge` command; this module imports nothing
heavy (torch, FastAPI, uvicorn load when the verb runs). `python -m lmforge serve` runs
the same command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint or run folder, .gguf file or sample name (smollm2); repeat to serve "
                        "several. The model id is NAME, else the sample name or the folder/file name. An "
                        "embedding model (minilm, a sentence-transformers folder) answers /v1/embeddings")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the first --model with this fine-tuned adapter as model NAME (repeatable; as "
                        "vLLM's --lora-modules; each adapter holds its own copy of the merged weights)")
    p.add_argument("--rag-index", action="append", default=[], metavar="NAME=FOLDER",
                   help="an index built by `lmforge rag index` (loaded with its own embedder); a chat "
                        'request with "retrieval": {"index": NAME} is answered from it, citing its passages')
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $LMFORGE_API_KEY; none)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together per model")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a batch slot before new ones get 429")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="cap prompt + reply tokens (default: the model's context)")
    p.add_argument("--cache", choices=["static", "paged"], default="static", help="KV cache layout")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="prompt tokens per engine step, so that a long prompt does not stall the other "
                        "streams (0: whole prompts; default: the engine's, 256)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="larger request bodies get 413")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights' number format")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    p.add_argument("--int8-activations", nargs="?", const="block", choices=["block", "token"], default=None,
                   metavar="block|token",
                   help="int8/int4 layers round their inputs to int8 too (scales per 32 inputs or per token)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engines (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds to let in-flight requests finish on Ctrl-C / SIGTERM")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's line and headers; slower ones are dropped")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `lmforge` subcommands."""
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API, with a playground",
                       description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /tokenize, /detokenize, /health, /metrics) and the "
                                   "playground at /. See docs/serving.md.")
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for listening beyond this machine without an API key (None when loopback or keyed)."""
    if api_key:
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name
        if host.lower() in ("localhost", "localhost."):
            return None
    return (f"lmforge serve: warning: listening on {host} without an API key: anyone who can reach this "
            "port can use the models (set --api-key or LMFORGE_API_KEY, or --host 127.0.0.1)")


def _adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--adapter {spec!r}: give NAME=DIR (the model id clients ask for, and the adapter)")
    return name, folder


def _index_spec(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--rag-index {spec!r}: give NAME=FOLDER (the name requests use, and the index)")
    return name, folder


def _is_embedding_model(path: str) -> bool:
    """A packaged sentence encoder's name, or a sentence-transformers folder (it has modules.json)."""
    from pathlib import Path

    from lmforge.rag.embed import SAMPLE_NAMES

    folder = Path(path).expanduser()
    return (not folder.exists() and path in SAMPLE_NAMES) or (folder / "modules.json").is_file()


def _load_retrievers(specs: list[tuple[str, str]], served: dict) -> dict:
    """{name: Retriever} over each index, with the embedder it was built with: the served embedding
    model of that name when there is one, else loaded (once per name)."""
    from lmforge.rag.embed import load_embedder
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import Retriever

    embedders = {embedder.name: embedder for embedder in served.values()}
    retrievers = {}
    for name, folder in specs:
        index = RagIndex.open(folder)
        wanted = index.embedder_name
        if wanted is not None and wanted not in embedders:
            embedders[wanted] = load_embedder(wanted)
        retrievers[name] = Retriever(index, embedders.get(wanted) if wanted else None)
        print(f"lmforge serve: index {name} from {folder}: {len(index.chunks):,} passages, embedder "
              f"{wanted or 'none (BM25 only)'}", file=sys.stderr)
    return retrievers


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from lmforge.infer.engine import PREFILL_CHUNK, Engine
    from lmforge.serve.app import create_app
    from lmforge.serve.catalog import model_id_for

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    if args.prefill_chunk is not None and args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0 (0: whole prompts), got {args.prefill_chunk}")
    if args.header_timeout <= 0:
        raise ValueError(f"--header-timeout must be > 0, got {args.header_timeout}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    specs = [model_id_for(spec) for spec in args.model]
    adapters = [_adapter_spec(spec) for spec in args.adapter]
    indexes = [_index_spec(spec) for spec in args.rag_index]
    if len({name for name, _ in indexes}) < len(indexes):
        raise ValueError("two --rag-index share a name: give each its own NAME=FOLDER")
    embedding_specs = [(name, path) for name, path in specs if _is_embedding_model(path)]
    specs = [spec for spec in specs if spec not in embedding_specs]
    if adapters and not specs:
        raise ValueError("--adapter applies to the first generating --model, and none was given")
    names = [name for name, _ in [*specs, *embedding_specs, *adapters]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two models are called {duplicates[0]!r}: name them with --model NAME=PATH or "
                         "--adapter NAME=DIR")
    from lmforge.tune.apply import adapter_step

    engines = {}
    loads = [(name, path, None) for name, path in specs]
    loads += [(name, specs[0][1], folder) for name, folder in adapters]
    for name, path, adapter in loads:
        with_adapter = f" with the adapter {adapter}" if adapter else ""
        print(f"lmforge serve: loading {name} from {path}{with_adapter}", file=sys.stderr)
        engines[name] = Engine.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device,
                                               quantize=args.quantize, max_batch_size=args.max_batch_size,
                                               activations={"block": "int8", "token": "int8-token"}.get(
                                                   args.int8_activations),
                                               max_seq_len=args.max_seq_len, cache=args.cache,
                                               prefill_chunk=(PREFILL_CHUNK if args.prefill_chunk is None
                                                              else args.prefill_chunk),
                                               prepare=adapter_step(adapter))
    from lmforge.rag.embed import load_embedder
    from lmforge.serve.limits import header_timeout_protocol

    embedders = {}
    for name, path in embedding_specs:
        print(f"lmforge serve: loading the embedding model {name} from {path}", file=sys.stderr)
        embedders[name] = load_embedder(path, device=args.device)
    retrievers = _load_retrievers(indexes, embedders)
    app = create_app(engines, api_key=args.api_key or None, max_queue=args.max_queue,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)), shutdown_timeout=args.shutdown_timeout,
                     embedders=embedders, retrievers=retrievers)
    print(f"lmforge serve: {', '.join([*engines, *embedders])} at http://{args.host}:{args.port}/v1 "
          f"(playground: http://{args.host}:{args.port}/){' with an API key' if args.api_key else ''}",
          file=sys.stderr)
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    # uvicorn shuts down gracefully on Ctrl-C, then replays the signal; with asyncio's own
    # handler that replay cancels the app's lifespan mid-exit and prints a traceback. A
    # handler of ours takes the replay instead, so Ctrl-C ends with a clean exit.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=int(args.shutdown_timeout),
                    http=header_timeout_protocol(args.header_timeout))
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
