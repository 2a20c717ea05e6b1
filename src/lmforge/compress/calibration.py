"""Calibration and held-out text for compression: token windows from text files or token shards.

GPTQ, AWQ, Wanda and SparseGPT look at what a model's layers see on real text; the
usual amount is 128 windows of 512 tokens (GPTQ's and AWQ's default), drawn at random
offsets. Judging the result needs *other* text: perplexity measured on the calibration
text flatters every method that fitted it. The defaults keep the two apart: calibration
from the Python HOWTOs, evaluation on the Python tutorial (both reST sources from the
`web` data sample, so both real and offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")


class CalibrationError(ValueError):
    """Calibration text that is missing, empty, or too short for what was asked."""


def default_calibration_files() -> list[Path]:
    from lmforge.data.samples import web_sample_dir

    return sorted((web_sample_dir(quiet=True) / "python-docs" / "rst" / "howto").glob("*.rst.txt"))


def default_heldout_files() -> list[Path]:
    from lmforge.data.samples import web_sample_dir

    return sorted((web_sample_dir(quiet=True) / "python-docs" / "rst" / "tutorial").glob("*.rst.txt"))


def _text_files(sources: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        elif source.is_file():
            files.append(source)
        else:
            raise CalibrationError(f"{source}: no such file or folder")
    return files


def token_stream(tokenizer, sources: Sequence[str | Path]) -> np.ndarray:
    """All tokens of the sources, in order, documents separated by the tokenizer's EOS.

    A source is a text file, a folder (its .txt/.rst/.md files, recursively) or a token
    shard folder from `lmforge tokenize` (one with meta.json: its train split is used)."""
    pieces: list[np.ndarray] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for source in map(Path, sources):
        if source.is_dir() and (source / "meta.json").exists():
            from lmforge.data.shards import load_shard_set

            _meta, shards = load_shard_set(source)
            pieces += [np.asarray(s.tokens, dtype=np.int64) for s in shards]
            continue
        for path in _text_files([source]):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise CalibrationError(f"{path}: not UTF-8 text (calibration reads text files or token "
                                       f"shard folders)") from None
            ids = tokenizer.encode(text)
            if ids:
                pieces.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64))
    if not pieces:
        raise CalibrationError(f"no text in {', '.join(map(str, sources))}")
    return np.concatenate(pieces)


def calibration_windows(tokens: np.ndarray, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """[samples, length] ids at random offsets of the stream (GPTQ's sampling)."""
    if samples < 1 or length < 2:
        raise CalibrationError(f"need at least 1 sample of 2 tokens, got {samples} x {length}")
    if len(tokens) < length:
        raise CalibrationError(f"the calibration text has {len(tokens):,} tokens, fewer than one window "
                               f"of {length}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length + 1, size=samples)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]))


def heldout_windows(tokens: np.ndarray, length: int, limit: int | None = None) -> torch.Tensor:
    """[n, length] consecutive, non-overlapping windows from the start (perplexity's usual cut)."""
    n = len(tokens) // length
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise CalibrationError(f"the held-out text has {len(tokens):,} tokens, fewer than one window of "
                               f"{length}")
    return torch.from_numpy(tokens[:n * length].reshape(n, length).copy())
