"""The reference BPE encoder: HF `tokenizers` BPE semantics, written to be read.

A BPE model is a vocabulary (token string -> id) and an ordered list of merges. To
encode one pre-tokenized piece (a string in the byte alphabet):

1. start from its characters, each looked up in the vocabulary;
2. among all adjacent pairs that appear in the merge list, take the one with the lowest
   merge rank (the leftmost one on ties) and replace it by the merged token;
3. repeat until no adjacent pair is a merge.

Only pairs listed as merges are merged: two tokens whose concatenation happens to be in
the vocabulary stay apart unless that exact pair was learned. (tiktoken merges any such
pair; `ranks.py` works out when the two rules agree.)

Options HF's BPE model has and byte-level models use: `ignore_merges` (Llama 3: a piece
that is itself a token is returned as that token without merging) and `unk_token` (a
character with no id becomes the unknown token; without one it is dropped, as in HF).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lmforge.tokenizer.errors import TokenizerError

#: Rank of a pair that is not a merge: larger than any real rank.
NO_MERGE = sys.maxsize


class BPE:
    """A byte-level BPE model (vocabulary + ranked merges) and its reference encoder."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        ignore_merges: bool = False,
        unk_token: str | None = None,
        fuse_unk: bool = False,
        cache_size: int = 100_000,
    ) -> None:
        self.vocab = vocab
        self.merges = list(merges)
        self.ignore_merges = ignore_merges
        self.unk_token = unk_token
        self.fuse_unk = fuse_unk
        if unk_token is not None and unk_token not in vocab:
            raise TokenizerError(f"BPE unk_token {unk_token!r} is not in the vocabulary")
        self.unk_id = vocab[unk_token] if unk_token is not None else None
        # (left id, right id) -> rank and -> merged id: the whole model in two dicts.
        self.pair_ranks: dict[tuple[int, int], int] = {}
        self.pair_merged: dict[tuple[int, int], int] = {}
        for rank, (left, right) in enumerate(self.merges):
            ids = [vocab.get(left), vocab.get(right), vocab.get(left + right)]
            if None in ids:
                missing = [t for t, i in zip((left, right, left + right), ids) if i is None]
                raise TokenizerError(f"merge #{rank} {left!r} + {right!r}: {missing!r} not in the vocabulary")
            # A pair listed twice keeps its last rank, as in HF (a later dict insert wins).
            self.pair_ranks[ids[0], ids[1]] = rank
            self.pair_merged[ids[0], ids[1]] = ids[2]
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size

    def encode_piece(self, piece: str) -> list[int]:
        """Token ids of one pre-tokenized piece (spelled in the byte alphabet)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return list(cached)
        if self.ignore_merges and piece in self.vocab:
            ids = [self.vocab[piece]]
        else:
            ids = self.merge(self.symbols(piece))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[piece] = ids
        return list(ids)

    def symbols(self, piece: str) -> list[int]:
        """The ids of the piece's characters, before any merge (unknown ones per HF rules)."""
        try:
            return [self.vocab[char] for char in piece]
        except KeyError:
            pass
        ids: list[int] = []
        after_unk = False
        for char in piece:
            token_id = self.vocab.get(char)
            if token_id is None:
                if self.unk_id is None:
                    continue  # HF drops a character it cannot spell when there is no unk token
                if self.fuse_unk and after_unk:
                    continue  # a run of unknown characters becomes one unk token
                token_id = self.unk_id
            after_unk = token_id == self.unk_id and char not in self.vocab
            ids.append(token_id)
        return ids

    def merge(self, ids: list[int], stop_rank: int = NO_MERGE) -> list[int]:
        """Apply merges with rank < `stop_rank` to `ids`, lowest rank (then leftmost) first."""
        ids = list(ids)
        rank_of = self.pair_ranks.get
        ranks = [rank_of(pair, NO_MERGE) for pair in zip(ids, ids[1:])]
        while ranks:
            best = min(ranks)
            if best >= stop_rank:
                break
            i = ranks.index(best)  # the leftmost pair with the lowest rank
            ids[i : i + 2] = [self.pair_merged[ids[i], ids[i + 1]]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of((ids[i - 1], ids[i]), NO_MERGE)
            if i < len(ranks):
                ranks[i] = rank_of((ids[i], ids[i + 1]), NO_MERGE)
        return ids
