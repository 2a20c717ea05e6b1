"""Sentence embeddings for retrieval: texts -> unit vectors whose dot product says how alike they are.

    from lmforge.rag.embed import load_embedder
    embedder = load_embedder("minilm")            # or a sentence-transformers folder
    vectors = embedder.encode(["a text", ...])     # (n, 384) float32, rows of length 1

`Embedder` joins lmforge's WordPiece tokenizer (`tokenizer.wordpiece`) and BERT encoder
(`model.encoder`); the vectors equal sentence-transformers' for the same folder. Texts longer
than the model's `max_tokens` (256 for MiniLM) are cut there, as sentence-transformers does:
chunk long documents before embedding them.

Speed comes from batching with little padding: every text is tokenized first, the texts are
sorted by token count, and each batch is padded only to its own longest text, so a batch of
short paragraphs costs what short paragraphs cost. The vectors go back in the input's order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.hub import resolve_model_path
from lmforge.model.encoder import SentenceEncoder, load_sentence_encoder
from lmforge.tokenizer.wordpiece import WordPiece, load_wordpiece

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Names an index may record -> the packaged sample they load (lmforge.hub's `minilm`).
SAMPLE_NAMES = {"minilm": MINILM_NAME, "all-minilm-l6-v2": MINILM_NAME, MINILM_NAME: MINILM_NAME}


class EmbedError(ValueError):
    """Input the embedder cannot encode (not text, a bad batch size), or a folder that is no sentence
    encoder."""


class Embedder:
    """A sentence encoder with its tokenizer: `encode(texts)` -> (len(texts), dim) float32, unit rows."""

    def __init__(self, name: str, model: SentenceEncoder, tokenizer: WordPiece) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.dim: int = model.dim
        self.max_tokens: int = model.max_seq_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids as the model sees them: [CLS] ... [SEP], cut at `max_tokens`."""
        lower = self.model.lowercase
        return [self.tokenizer.encode(t.lower() if lower else t, max_length=self.max_tokens) for t in texts]

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised rows (when the model normalises, as MiniLM does)."""
        if isinstance(texts, str):
            raise EmbedError("encode takes a list of texts, not one string (wrap it: [text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EmbedError(f"text {i} is a {type(text).__name__}, not a string")
        return self.encode_ids(self.token_ids(texts), batch_size=batch_size, progress=progress)

    def encode_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 64,
                   progress: bool = False) -> np.ndarray:
        """`encode` of texts already turned into `token_ids` (a caller that also counts them, as the
        server's usage does, tokenizes once)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EmbedError(f"batch_size must be a positive integer, got {batch_size!r}")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        update = _progress(f"embedding {len(ids):,} texts") if progress and len(ids) else None
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch, mask = _padded([ids[i] for i in rows], self.tokenizer.pad_id)
                out[rows] = self.model(batch.to(device), mask.to(device)).cpu().numpy()
                if update is not None:
                    update(min(start + batch_size, len(order)), len(order))
        return out


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] padded to the longest row, and the mask [B, T] of real tokens."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    mask = np.arange(lengths.max()) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for row in rows for t in row), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _progress(what: str):
    from lmforge.progress import Progress

    return Progress().phase(what)


def load_embedder(name_or_path: str | os.PathLike[str] = "minilm", *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> Embedder:
    """`minilm` (or the name an index recorded, sentence-transformers/all-MiniLM-L6-v2) -> the packaged
    all-MiniLM-L6-v2, fetched once; anything else is a sentence-transformers (or BERT) folder."""
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if not path.exists() and spec in SAMPLE_NAMES:
        folder, name = resolve_model_path("minilm"), SAMPLE_NAMES[spec]
    else:
        folder = resolve_model_path(spec)
        name = str(folder.resolve())
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise EmbedError(f"{folder}: not a sentence-transformers folder (config.json, model.safetensors, "
                         "tokenizer.json or vocab.txt, modules.json)")
    return Embedder(name, load_sentence_encoder(folder, device=device, dtype=dtype), load_wordpiece(folder))
