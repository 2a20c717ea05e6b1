"""The fast path: the same ids as the reference encoder, computed by tiktoken.

tiktoken runs the pre-tokenizer regex and the BPE merges in Rust. `FastEncoder.build`
hands it the model's vocabulary as ranks (`ranks.tiktoken_ranks`, which also proves the
ids will be identical) and the pre-tokenizer as one regex. Three cases:

- the pre-tokenizer has a known single regex (`PreTokenizer.fused_pattern`): tiktoken
  does everything ("tiktoken");
- it has several steps with no known single regex: Python cuts the text into pieces and
  tiktoken merges each distinct piece once ("tiktoken+python-split");
- the vocabulary cannot be expressed as ranks: `build` raises `TokenizerError` with the
  reason and the tokenizer keeps using the reference encoder.

When a model's ids are not its ranks (ids out of merge order), an array maps tiktoken's
ranks back to ids. Text with a character whose bytes have no token (SmolLM2 has no
token for byte 0x04, say) is left to the reference encoder, which handles it as HF does.
"""

from __future__ import annotations

import numpy as np
import regex
import tiktoken

from lmforge.tokenizer.bpe import BPE
from lmforge.tokenizer.bytelevel import chars_to_bytes
from lmforge.tokenizer.pretokenize import PreTokenizer
from lmforge.tokenizer.ranks import RankTable, rank_table

#: Matches any whole piece: with it, tiktoken merges a piece we cut ourselves as one.
_WHOLE_PIECE = r"(?s:.+)"


class FastEncoder:
    """Encodes ordinary text (no added tokens) with tiktoken, ids identical to `BPE`."""

    def __init__(
        self, bpe: BPE, table: RankTable, pretokenizer: PreTokenizer, cache_size: int = 100_000
    ) -> None:
        self.bpe = bpe
        self.table = table
        self.pretokenizer = pretokenizer
        self.pattern = pretokenizer.fused_pattern
        self.kind = "tiktoken" if self.pattern is not None else "tiktoken+python-split"
        self.encoding = tiktoken.Encoding(
            "lmforge",
            pat_str=self.pattern or _WHOLE_PIECE,
            mergeable_ranks=table.mergeable_ranks,
            special_tokens={},
        )
        self.rank_to_id = table.rank_to_id
        self.unencodable = _chars_with_bytes(table.missing_bytes)
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size

    @classmethod
    def build(
        cls,
        bpe: BPE,
        pretokenizer: PreTokenizer,
        known_ranks: dict[bytes, int] | None = None,
    ) -> FastEncoder:
        """A fast encoder for `bpe`, or TokenizerError when tiktoken cannot match it.

        `known_ranks`: the tiktoken ranks `bpe` was made from, which need no check.
        """
        return cls(bpe, rank_table(bpe, known_ranks), pretokenizer)

    def can_encode(self, text: str) -> bool:
        """False when `text` holds a character some byte of which has no token."""
        return self.unencodable is None or self.unencodable.search(text) is None

    def encode(self, text: str) -> list[int]:
        if self.pattern is not None:
            return self._to_ids(self.encoding.encode_ordinary(text))
        ids: list[int] = []
        for piece in self.pretokenizer.split(text):
            ids.extend(self._encode_piece(piece))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        if self.pattern is None:
            return [self.encode(text) for text in texts]
        batches = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        return [self._to_ids(ranks) for ranks in batches]

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            # The piece is spelled in the byte alphabet; tiktoken wants its real text, which
            # a step after ByteLevel may have cut inside a character: those go the slow way.
            try:
                ids = self._to_ids(self.encoding.encode_ordinary(chars_to_bytes(piece).decode("utf-8")))
            except UnicodeDecodeError:
                ids = self.bpe.encode_piece(piece)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _to_ids(self, ranks: list[int]) -> list[int]:
        if self.rank_to_id is None:
            return ranks
        return self.rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist()


def _chars_with_bytes(missing: frozenset[int]) -> regex.Pattern[str] | None:
    """A regex matching every character whose UTF-8 encoding contains a missing byte."""
    if not missing:
        return None
    codepoints = np.arange(0x110000, dtype=np.int64)
    codepoints = codepoints[(codepoints < 0xD800) | (codepoints > 0xDFFF)]  # no surrogates in str
    bad = np.zeros(len(codepoints), dtype=bool)
    is_missing = np.zeros(256, dtype=bool)
    is_missing[list(missing)] = True
    # UTF-8 bytes of each code point, by length class: lead byte, then 6-bit continuations.
    n = np.select([codepoints < 0x80, codepoints < 0x800, codepoints < 0x10000], [1, 2, 3], 4)
    lead = np.select(
        [n == 1, n == 2, n == 3],
        [codepoints, 0xC0 | (codepoints >> 6), 0xE0 | (codepoints >> 12)],
        0xF0 | (codepoints >> 18),
    )
    bad |= is_missing[lead]
    for shift in (0, 6, 12):
        cont = 0x80 | ((codepoints >> shift) & 0x3F)
        present = n > shift // 6 + 1
        bad |= present & is_missing[cont]
    ranges = _ranges(codepoints[bad])
    if not ranges:
        return None
    parts = "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in ranges)
    return regex.compile(f"[{parts}]")


def _ranges(values: np.ndarray) -> list[tuple[int, int]]:
    if len(values) == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate([[values[0]], values[breaks + 1]])
    ends = np.concatenate([values[breaks], [values[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def _escape(codepoint: int) -> str:
    return f"\\U{codepoint:08x}"
