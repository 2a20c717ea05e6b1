"""The `perplexity` task: how well a model predicts text, per token and per byte.

Each document is scored whole by `EvalModel.rolling_token_scores` (lm-eval's
`loglikelihood_rolling`: the prefix token, then disjoint windows of the model's context;
every token predicted once). Over all documents, with L the summed log-likelihood in nats:

- perplexity = exp(-L / tokens): depends on the tokenizer (fewer, longer tokens make each
  one harder to predict), so it compares models that share a tokenizer;
- bits per byte = -L / (ln 2 * UTF-8 bytes): the same text costs the same bytes whatever
  the tokenizer, so this one compares across tokenizers (lm-eval's `bits_per_byte`,
  nanochat's `bpb`); byte perplexity = 2^bits_per_byte;
- word perplexity = exp(-L / words), words split on whitespace (lm-eval's wikitext).

Data (`--data`): text files, folders of .txt/.rst/.md files (one document per file),
JSONL files (one document per row's "text"), or token shard folders from
`lmforge tokenize` (one document per shard; bytes are those the tokens decode to, special
tokens counting none). Default: the Python tutorial (reST sources from the web sample),
the held-out text `lmforge quantize --measure` uses.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.eval.lm import EvalModel, Progress
from lmforge.eval.tasks import TaskResult, sample_items

__all__ = ["Document", "PerplexityTask", "read_documents"]

TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")


@dataclass(frozen=True)
class Document:
    name: str
    text: str | None = None  # a text document ...
    tokens: tuple[int, ...] | None = None  # ... or one already tokenized (a shard)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (perplexity reads text, JSONL or token shards)") from None


def read_documents(sources: Sequence[Path]) -> list[Document]:
    """The documents of text files, folders, JSONL files and token shard folders (module docstring)."""
    documents: list[Document] = []
    for source in sources:
        if source.is_dir() and (source / "meta.json").exists():
            from lmforge.data.shards import load_shard_set

            _meta, shards = load_shard_set(source)
            documents += [Document(f"{source}/{i}", tokens=tuple(int(t) for t in s.tokens))
                          for i, s in enumerate(shards)]
        elif source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            documents += [Document(str(p), text=_read_text(p)) for p in files]
        elif source.is_file() and source.suffix == ".jsonl":
            for number, line in enumerate(_read_text(source).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source}:{number}: not JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{source}:{number}: a perplexity JSONL row needs a \"text\" field")
                documents.append(Document(f"{source}:{number}", text=row["text"]))
        elif source.is_file():
            documents.append(Document(str(source), text=_read_text(source)))
        else:
            raise ValueError(f"{source}: no such file or folder")
    documents = [d for d in documents if (d.text if d.text is not None else d.tokens)]
    if not documents:
        raise ValueError(f"no text in {', '.join(map(str, sources))}")
    return documents


def default_documents() -> list[Document]:
    from lmforge.data.samples import web_sample_dir

    return read_documents([web_sample_dir(quiet=True) / "python-docs" / "rst" / "tutorial"])


class PerplexityTask:
    """The `perplexity` task (see the module docstring)."""

    name = "perplexity"

    def __init__(self, data: Sequence[Path] = ()) -> None:
        self.paths = list(data)

    def run(self, model: EvalModel, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        if shots:
            raise ValueError("--shots does not apply to perplexity")
        documents = read_documents(self.paths) if self.paths else default_documents()
        documents = sample_items(documents, limit, seed)
        tokenized = [list(d.tokens) if d.tokens is not None else model.tok_encode(d.text or "")
                     for d in documents]
        vocab = model.model.config.vocab_size
        for d, tokens in zip(documents, tokenized):
            if any(not 0 <= t < vocab for t in tokens):
                raise ValueError(f"{d.name}: token ids outside the model's vocabulary ({vocab}): shards made "
                                 "with another tokenizer?")
        started = time.perf_counter()
        scores = model.rolling_token_scores(tokenized, progress=progress)
        seconds = time.perf_counter() - started
        records = []
        for d, tokens, (logp, count) in zip(documents, tokenized, scores):
            text = d.text if d.text is not None else \
                model.tokenizer.decode_bytes(tokens, skip_special=True).decode("utf-8", "replace")
            size = len(text.encode("utf-8")) if d.text is not None else \
                len(model.tokenizer.decode_bytes(tokens, skip_special=True))
            records.append({"document": d.name, "loglikelihood": logp, "tokens": count, "bytes": size,
                            "words": len(re.split(r"\s+", text))})
        total = sum(r["loglikelihood"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        size = sum(r["bytes"] for r in records)
        words = sum(r["words"] for r in records)
        bpb = -total / (math.log(2) * size) if size else float("nan")
        metrics = {"perplexity": math.exp(-total / tokens), "bits_per_byte": bpb, "byte_perplexity": 2 ** bpb,
                   "word_perplexity": math.exp(-total / words), "tokens": tokens, "bytes": size,
                   "documents": len(records)}
        info = {"limit": limit, "seed": seed, "window": model.max_length, "seconds": seconds,
                "data": [str(p) for p in self.paths] or ["python-docs/rst/tutorial (web sample)"]}
        return TaskResult(self.name, metrics, records, {}, info)
