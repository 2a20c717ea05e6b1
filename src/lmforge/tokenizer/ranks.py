"""Translating between HF-style merge lists and tiktoken-style ranks, exactly.

The two formats describe BPE differently:

- HF `tokenizers` (and GGUF) keep an ordered list of merges (left, right); only a listed
  pair is ever merged, the lowest-ranked first (leftmost on ties).
- tiktoken keeps one rank per token (its bytes); any adjacent pair whose concatenation is
  a token may be merged, the lowest token rank first (leftmost on ties), and a piece that
  is itself a token is returned whole without merging at all.

Both rest on one fact about either merge loop. Look at any stretch of bytes inside a
piece: until a merge crosses its edges, the merges inside it happen exactly as they
would if the stretch were the whole piece (outside merges cannot change which pair
inside is lowest). So if a token t is ever built inside a longer piece, from a pair
(x, y) covering exactly t's bytes, then running the loop on t's bytes alone builds t from
that same pair. Each token has one "building pair", found by one run on its own bytes,
and no other pair ever produces it.

`merges_from_ranks` uses this to turn tiktoken ranks into merges: one merge per token,
its building pair, in rank order. With `ignore_merges` (tiktoken's whole-piece rule)
the HF loop then takes the very same steps as tiktoken on every input.

`tiktoken_ranks` goes the other way, for the fast path, and proves it may. Give each
token the rank of its first merge. The two loops take the same steps on every input as
long as (1) the merges that make one token are consecutive in the list (Llama 3 lists
several per token), so that comparing merges and comparing tokens agree, and (2) no
token t that tiktoken may produce has bytes on which HF's loop ends in exactly two
parts: tiktoken would glue those two into t, HF would not. (Ending in [t] or in three or
more parts is fine.) A token HF never reaches is left out of the ranks, unless
`ignore_merges` lets HF return it for a whole piece, which tiktoken does too.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.tokenizer.bpe import BPE, NO_MERGE
from lmforge.tokenizer.bytelevel import BYTE_TO_CHAR, bytes_to_chars, chars_to_bytes, is_byte_level
from lmforge.tokenizer.errors import TokenizerError


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """A `.tiktoken` rank file: one "<base64 token> <rank>" per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise TokenizerError(f"{path}:{number}: not a '<base64> <rank>' line: {line[:60]!r}") from err
    return ranks


def _tiktoken_building_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """tiktoken's merge loop on a token's own bytes (without the whole-piece rule): the
    pair glued last if the loop ends in the token, else None."""
    parts = [token[i : i + 1] for i in range(len(token))]
    last: tuple[bytes, bytes] | None = None
    pair_ranks = [ranks.get(a + b, NO_MERGE) for a, b in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == NO_MERGE:
            break
        i = pair_ranks.index(best)  # the leftmost pair with the lowest rank
        last = (parts[i], parts[i + 1])
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], NO_MERGE)
    return last if len(parts) == 1 else None


def merges_from_ranks(mergeable_ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF vocabulary and merges that encode exactly like tiktoken over these ranks.

    Use with `ignore_merges=True`: tokens that tiktoken reaches only as a whole piece get
    no merge. The vocabulary maps each token, spelled in the byte alphabet, to its rank.
    """
    vocab = {bytes_to_chars(token): rank for token, rank in mergeable_ranks.items()}
    if len(vocab) != len(set(vocab.values())):
        raise TokenizerError("tiktoken ranks must be unique: two tokens share a rank")
    merges: list[tuple[str, str]] = []
    for token, _ in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        pair = _tiktoken_building_pair(token, mergeable_ranks)
        if pair is not None:
            merges.append((bytes_to_chars(pair[0]), bytes_to_chars(pair[1])))
    return vocab, merges


@dataclass(frozen=True)
class RankTable:
    """What tiktoken needs to encode like a `BPE` model, and how to map its ranks back.

    `rank_to_id` is None when the ranks are the model's own ids. `missing_bytes` are
    bytes with no single-byte token: text containing them must take the reference path
    (HF drops or replaces such bytes before merging; tiktoken cannot).
    """

    mergeable_ranks: dict[bytes, int]
    rank_to_id: np.ndarray | None
    missing_bytes: frozenset[int]

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int]) -> RankTable:
        """The table of a tokenizer that was made from these tiktoken ranks (ids = ranks)."""
        present = {token[0] for token in mergeable_ranks if len(token) == 1}
        return cls(mergeable_ranks, None, frozenset(range(256)) - present)


def rank_table(bpe: BPE, known_ranks: dict[bytes, int] | None = None) -> RankTable:
    """`RankTable.from_ranks(known_ranks)` for a model made from tiktoken ranks (they need
    no check), else `tiktoken_ranks(bpe)`."""
    return RankTable.from_ranks(known_ranks) if known_ranks is not None else tiktoken_ranks(bpe)


def tiktoken_ranks(bpe: BPE) -> RankTable:
    """Ranks under which tiktoken encodes exactly like `bpe`, or TokenizerError saying why not.

    See the module docstring for why the checks suffice. Costs one run of the reference
    merge loop per vocabulary entry: about a second per 100k tokens.
    """
    if bpe.unk_id is not None:
        raise TokenizerError("the model has an unk_token, which tiktoken cannot produce")
    byte_ids = {byte: bpe.vocab[char] for byte, char in enumerate(BYTE_TO_CHAR) if char in bpe.vocab}
    missing = frozenset(range(256)) - set(byte_ids)
    is_byte = set(byte_ids.values())

    made: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # id -> [(rank, left, right)]
    for (left, right), rank in bpe.pair_ranks.items():
        made[bpe.pair_merged[left, right]].append((rank, left, right))

    # The tokens tiktoken may produce (besides single bytes).
    candidates = sorted(
        (
            (len(text), token_id, text)
            for text, token_id in bpe.vocab.items()
            if len(text) >= 2
            and token_id not in is_byte
            and is_byte_level(text)
            and (token_id in made or bpe.ignore_merges)
        )
    )
    ranked: list[tuple[int, int, bytes]] = []  # (first merge rank, id, bytes)
    for _, token_id, text in candidates:
        state = bpe.merge(bpe.symbols(text))
        if len(state) == 2:
            raise TokenizerError(
                f"on the bytes of token {text!r} (id {token_id}) the merges stop at {state}, "
                "which tiktoken would glue into the token and HF does not"
            )
        if state != [token_id] and not bpe.ignore_merges:
            continue  # HF never produces this token: leave it out
        first_rank = min((rank for rank, _, _ in made.get(token_id, [])), default=NO_MERGE)
        ranked.append((first_rank, token_id, chars_to_bytes(text)))
    ranked.sort()

    # One rank per token: the merges making one token must not be interleaved with others'.
    spans = [
        (min(r for r, _, _ in made[i]), max(r for r, _, _ in made[i]), i) for _, i, _ in ranked if i in made
    ]
    for (_, last, before), (first, _, after) in zip(spans, spans[1:]):
        if last > first:
            raise TokenizerError(
                f"the merges making token id {before} are interleaved with those making "
                f"token id {after}; tiktoken gives each token one rank"
            )

    merged_ids = [token_id for rank, token_id, _ in ranked if rank != NO_MERGE]
    if all(a < b for a, b in zip(merged_ids, merged_ids[1:])):
        table = {bytes([byte]): token_id for byte, token_id in byte_ids.items()}
        table.update({data: token_id for _, token_id, data in ranked})
        return RankTable(table, None, missing)
    # Ids are not in merge order: ranks 0..255 for bytes, then tokens in merge order, mapped back.
    table, rank_to_id = {}, np.full(256 + len(ranked), -1, dtype=np.int64)
    for byte, token_id in byte_ids.items():
        table[bytes([byte])] = byte
        rank_to_id[byte] = token_id
    for k, (_, token_id, data) in enumerate(ranked, start=256):
        table[data] = k
        rank_to_id[k] = token_id
    return RankTable(table, rank_to_id, missing)
