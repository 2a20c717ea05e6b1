"""Token shards: documents turned into flat arrays of token ids, ready for pretraining.

Training reads billions of tokens in random windows; re-tokenizing text every epoch
would waste most of the time, so `lmforge tokenize` does it once. Each shard is a
safetensors file with two arrays:

- ``tokens``: every document's ids back to back, uint16 when the vocabulary fits in
  65,536 ids (half the disk and memory bandwidth of uint32), else uint32. Each document
  is wrapped in BOS ... EOS where the tokenizer has them, so a window that spans a
  boundary tells the model where one document ends and the next begins.
- ``doc_starts``: the offset of each document's first token (int64), so BOS-aligned
  packing and per-document statistics need no scan.

Documents go to the validation split by a hash of their id, not by their position, so
the split is the same however the input is ordered or sharded. `meta.json` records the
tokenizer, dtype, special ids and counts (tokens, documents, bytes per token).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_write
from lmforge.data.document import Document, StageStats
from lmforge.data.errors import DataInputError
from lmforge.data.readers import discover_inputs, read_input
from lmforge.formats.safetensors_reader import SafetensorsError, read_header
from lmforge.formats.strictjson import JSONInputError, read_json

SPLITS = ("train", "val")
SHARD_SUFFIX = ".safetensors"
TOKENIZER_FOLDER = "tokenizer"  # a copy of the tokenizer inside the shard folder


@dataclass
class TokenizeConfig:
    val_fraction: float = 0.005  # share of documents (by id hash) held out for validation
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB at uint16)
    add_bos: bool = True  # wrap documents in BOS ... EOS when the tokenizer has those tokens
    add_eos: bool = True
    batch_documents: int = 256  # documents encoded per call (tiktoken encodes a batch in threads)
    min_tokens: int = 1  # documents shorter than this (before BOS/EOS) are skipped

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataInputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise DataInputError(f"shard_tokens must be at least 1024, got {self.shard_tokens}")
        if self.batch_documents < 1:
            raise DataInputError(f"batch_documents must be positive, got {self.batch_documents}")


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    shards: list[str] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        content_tokens = self.tokens
        return self.text_bytes / content_tokens if content_tokens else 0.0


@dataclass
class TokenizeReport:
    output: str
    tokenizer: str
    vocab_size: int
    dtype: str
    bos_token_id: int | None
    eos_token_id: int | None
    splits: dict[str, SplitStats]
    skipped: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)  # what happened that the user would not expect

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, split in self.splits.items():
            out["splits"][name]["bytes_per_token"] = round(split.bytes_per_token, 4)
        return out

    def to_table(self) -> str:
        lines = [
            f"tokenized with {self.tokenizer} (vocab {self.vocab_size:,}, {self.dtype}) "
            f"in {self.seconds:.1f}s -> {self.output}",
            f"{'split':<6} {'documents':>10} {'tokens':>14} {'bytes/token':>12} {'shards':>7}",
        ]
        for name, s in self.splits.items():
            lines.append(
                f"{name:<6} {s.documents:>10,} {s.tokens:>14,} {s.bytes_per_token:>12.3f} {len(s.shards):>7}"
            )
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items())))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """A stable coin flip from the id: the same document always lands in the same split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Accumulates one split's tokens and writes a shard file whenever it is full."""

    def __init__(
        self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, stats: SplitStats
    ) -> None:
        self.folder, self.split, self.dtype, self.limit, self.stats = (
            folder,
            split,
            dtype,
            shard_tokens,
            stats,
        )
        self.pieces: list[np.ndarray] = []
        self.starts: list[int] = []
        self.size = 0

    def add(self, ids: np.ndarray) -> None:
        if self.size and self.size + len(ids) > self.limit:
            self.flush()
        self.starts.append(self.size)
        self.pieces.append(ids)
        self.size += len(ids)

    def flush(self) -> None:
        if not self.size:
            return
        from safetensors.numpy import save

        tokens = np.concatenate(self.pieces).astype(self.dtype, copy=False)
        name = f"{self.split}-{len(self.stats.shards):05d}{SHARD_SUFFIX}"
        payload = save(
            {"tokens": tokens, "doc_starts": np.asarray(self.starts, dtype=np.int64)},
            metadata={"format": "lmforge-token-shard", "split": self.split},
        )
        with atomic_write(self.folder / name) as f:
            f.write(payload)
        self.stats.shards.append(name)
        self.pieces, self.starts, self.size = [], [], 0


class SplitWriter:
    """Sends each encoded document to its split's shards, and keeps something to train on.

    The first validation document waits until a training one exists: if none ever does
    (one long text, say), it trains instead of leaving nothing to train on. The order of
    `add` calls alone decides the bytes written, so any path that adds the same documents
    in the same order (one process, or tasks on an executor) writes the same shards.
    """

    def __init__(self, folder: Path, dtype: np.dtype, config: TokenizeConfig) -> None:
        self.config = config
        self.splits = {name: SplitStats() for name in SPLITS}
        self.writers = {name: _ShardWriter(folder, name, dtype, config.shard_tokens, self.splits[name])
                        for name in SPLITS}
        self.held: tuple[np.ndarray, int] | None = None

    def add(self, split: str, ids: np.ndarray, text_bytes: int) -> None:
        """`ids` already wrapped in BOS ... EOS."""
        if split == "val" and self.held is None and not self.splits["train"].documents:
            self.held = (ids, text_bytes)
            return
        if split == "train" and self.held is not None:  # something trains after all: the held one validates
            self._write("val", *self.held)
            self.held = None
        self._write(split, ids, text_bytes)

    def _write(self, split: str, ids: np.ndarray, text_bytes: int) -> None:
        self.writers[split].add(ids)
        stats = self.splits[split]
        stats.documents += 1
        stats.tokens += len(ids)
        stats.text_bytes += text_bytes

    def close(self) -> list[str]:
        """Flush every shard; returns the notes to show the user."""
        notes: list[str] = []
        if self.held is not None:  # nothing went to training: the first held-out document trains instead
            self._write("train", *self.held)
            self.held = None
            if self.splits["val"].documents:
                notes.append(f"every document fell in the validation split (val_fraction "
                             f"{self.config.val_fraction}); the first one trains instead")
            else:
                notes.append(f"the only document fell in the validation split (val_fraction "
                             f"{self.config.val_fraction}); it trains instead, so there is no validation "
                             "split (give several documents, e.g. one file per chapter, for a held-out loss)")
        for writer in self.writers.values():
            writer.flush()
        if not self.splits["train"].tokens:
            raise DataInputError("no documents to tokenize: the input held no text")
        return notes


def special_ids(tokenizer: Any, config: TokenizeConfig) -> tuple[int | None, int | None]:
    """The BOS and EOS ids that wrap every document (None where the tokenizer lacks one)."""
    bos = tokenizer.bos_token_id if config.add_bos else None
    eos = tokenizer.eos_token_id if config.add_eos else None
    if bos is None and eos is None and (config.add_bos or config.add_eos):
        raise DataInputError("the tokenizer has neither a BOS nor an EOS token to mark document boundaries")
    return bos, eos


def encode_documents(documents: Iterable[Document], tokenizer: Any, config: TokenizeConfig,
                     skipped: dict[str, int]) -> Iterator[tuple[str, np.ndarray, int]]:
    """``(split, ids wrapped in BOS ... EOS, text bytes)`` per document, in order; documents
    under `config.min_tokens` are counted in `skipped` instead."""
    bos, eos = special_ids(tokenizer, config)
    for batch in _batches(documents, config.batch_documents):
        encoded = tokenizer.encode_batch([doc.text for doc in batch], add_bos=False, add_eos=False,
                                         allow_special=False)
        for doc, ids in zip(batch, encoded):
            if len(ids) < config.min_tokens:
                skipped["too_short"] = skipped.get("too_short", 0) + 1
                continue
            wrapped = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
            split = "val" if is_validation(doc.id, config.val_fraction) else "train"
            yield split, np.asarray(wrapped, dtype=np.int64), len(doc.text.encode("utf-8"))


def start_shard_folder(output: str | os.PathLike[str]) -> Path:
    """The output folder, emptied of an earlier run's meta.json and shards."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "meta.json").exists():
        (folder / "meta.json").unlink()  # about to be rewritten: never pair old meta with new shards
    for old in folder.glob(f"*{SHARD_SUFFIX}"):
        old.unlink()
    return folder


def finish_shard_folder(folder: Path, tokenizer: Any, writer: SplitWriter, config: TokenizeConfig,
                        skipped: dict[str, int], started: float, tokenizer_name: str) -> TokenizeReport:
    """Flush the shards, copy the tokenizer, and write meta.json last."""
    notes = writer.close()
    if hasattr(tokenizer, "save"):  # the shards carry their tokenizer: pretraining stores it with checkpoints
        tokenizer.save(folder / TOKENIZER_FOLDER)
    bos, eos = special_ids(tokenizer, config)
    report = TokenizeReport(
        output=str(folder),
        tokenizer=tokenizer_name,
        vocab_size=tokenizer.vocab_size,
        dtype=token_dtype(tokenizer.vocab_size).name,
        bos_token_id=bos,
        eos_token_id=eos,
        splits=writer.splits,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        notes=notes,
    )
    meta = report.to_dict() | {"format": "lmforge-token-shards", "config": asdict(config)}
    with atomic_write(folder / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    return report


def tokenize_documents(
    documents: Iterable[Document],
    tokenizer: Any,
    output: str | os.PathLike[str],
    config: TokenizeConfig | None = None,
    *,
    tokenizer_name: str = "",
    progress: Callable[[int, int, float], None] | None = None,
) -> TokenizeReport:
    """Encode `documents` into train/val shards under `output` and write meta.json last.

    meta.json is written only once every shard is on disk, so a folder with meta.json
    is complete; an interrupted run leaves none and is simply run again. (`lmforge
    tokenize` runs the same encoding as tasks on an executor: `lmforge.data.tokenize_tasks`.)
    """
    config = config or TokenizeConfig()
    config.validate()
    folder = start_shard_folder(output)
    special_ids(tokenizer, config)
    writer = SplitWriter(folder, token_dtype(tokenizer.vocab_size), config)
    skipped: dict[str, int] = {}
    started = time.perf_counter()
    documents_seen = tokens_seen = 0
    for split, ids, text_bytes in encode_documents(documents, tokenizer, config, skipped):
        writer.add(split, ids, text_bytes)
        documents_seen += 1
        tokens_seen += len(ids)
        if progress and documents_seen % config.batch_documents == 0:
            progress(documents_seen, tokens_seen, time.perf_counter() - started)
    if progress:
        progress(documents_seen, tokens_seen, time.perf_counter() - started)
    return finish_shard_folder(folder, tokenizer, writer, config, skipped, started, tokenizer_name)


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_documents_from(inputs: Sequence[str | os.PathLike[str]]) -> Iterator[Document]:
    """Documents from `prepare`'s output (Parquet/JSONL) or any other readable input.

    A `prepare` output folder also holds its report and work files; only its final
    ``part-*`` files are documents.
    """
    paths: list[str | os.PathLike[str]] = []
    for raw in inputs:
        folder = Path(raw)
        parts = sorted(folder.glob("part-*")) if folder.is_dir() and (folder / "report.json").exists() else []
        paths.extend(parts or [raw])
    stats = StageStats("read")
    for item in discover_inputs(paths):
        yield from read_input(item, stats)


# ------------------------------------------------------------------------------ reading
@dataclass
class TokenShard:
    """One shard, memory-mapped: nothing is read until a slice of `tokens` is touched."""

    path: Path
    tokens: np.ndarray
    doc_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


_SAFETENSORS_DTYPES = {"U16": np.uint16, "U32": np.uint32, "I64": np.int64}


def open_shard(path: str | os.PathLike[str]) -> TokenShard:
    """Memory-map a shard's arrays straight from the safetensors file (no copy, no pickle).

    The header goes through `lmforge.formats.safetensors_reader` (length, depth-bounded
    JSON, byte ranges), and ``doc_starts`` must be offsets into ``tokens`` in order, so
    a damaged shard fails here rather than as windows that silently read the wrong tokens.
    """
    path = Path(path)
    try:
        header = read_header(path)
    except SafetensorsError as err:
        raise DataInputError(f"not a token shard: {err}") from err
    arrays: dict[str, np.ndarray] = {}
    for name in ("tokens", "doc_starts"):
        entry = header.tensors.get(name)
        if entry is None or entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise DataInputError(f"{path} is not a token shard (no valid {name!r} array)")
        dtype, count = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]), math.prod(entry["shape"])
        offset = header.data_start + entry["data_offsets"][0]
        arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count
                        else np.zeros(0, dtype))
    starts, size = arrays["doc_starts"], len(arrays["tokens"])
    if len(starts) and (int(starts.min()) < 0 or int(starts.max()) >= size or np.any(np.diff(starts) < 0)):
        raise DataInputError(f"{path} is corrupt: doc_starts are not increasing offsets into its "
                             f"{size:,} tokens")
    return TokenShard(path=path, tokens=arrays["tokens"], doc_starts=starts)


def load_shard_set(
    folder: str | os.PathLike[str], split: str = "train"
) -> tuple[dict[str, Any], list[TokenShard]]:
    """meta.json and the shards of one split; a folder without meta.json is an unfinished run.

    meta.json is input like any other: the shard names it lists must be plain files of
    this folder (no ``../``, no absolute path, no symlink leading out of it).
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise DataInputError(
            f"{folder} holds no finished token shards (no meta.json): run `lmforge tokenize`"
        )
    try:
        meta = read_json(meta_path, allow_nonfinite=True)
    except JSONInputError as err:
        raise DataInputError(f"not a token shard folder: {err}") from err
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(s, dict) for s in splits.values()):
        raise DataInputError(f"{meta_path} is not a token shard index (no 'splits' object)")
    vocab_size = meta.get("vocab_size", 0)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 0:
        raise DataInputError(f"{meta_path}: vocab_size must be a non-negative integer, got {vocab_size!r}")
    if split not in splits:
        raise DataInputError(f"{folder} has no {split!r} split")
    names = splits[split].get("shards")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataInputError(f"{meta_path}: the {split!r} split has no list of shard file names")
    paths = [_shard_path(folder, meta_path, name) for name in names]
    missing = [n for n, p in zip(names, paths) if not p.exists()]
    if missing:
        raise DataInputError(f"{folder} is missing shard(s) {', '.join(missing)}")
    return meta, [open_shard(p) for p in paths]


def _shard_path(folder: Path, meta_path: Path, name: str) -> Path:
    """`folder / name`, refusing a name that reaches outside the folder (directly or by symlink)."""
    if Path(name).name != name or name in ("", ".", "..") or "\\" in name:
        raise DataInputError(f"{meta_path}: shard {name!r} is not a file name inside {folder}")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataInputError(f"{meta_path}: shard {name!r} leads to {path.resolve()}, outside {folder}")
    return path
