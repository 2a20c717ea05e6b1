"""Supervised fine-tuning batches: conversations rendered by the chat template, trained on the
assistant's replies only, packed into rows without attention between examples.

1. `encode_example`: the template renders a conversation and the tokenizer marks which
   tokens belong to the assistant's replies (each reply and its end-of-turn token). A
   position t predicts token t+1, so it takes a loss exactly when token t+1 is the
   assistant's: ``labels[t] = ids[t+1] if mask[t+1] else IGNORE_INDEX``, and the last
   position, with no next token, takes none. The user's words and the system prompt are
   read, never learnt.
2. `encode_examples`: an example longer than the row is cut to its first `seq_len` tokens
   (a reply cut in the middle still teaches its beginning); one with no labelled token
   left (the cut came before any reply) is dropped. Both are counted.
3. `split_examples`: a stable coin flip from each conversation's text holds some out for
   validation; the same conversation always lands on the same side.
4. `PackedSFT` (a `BatchSource`): each epoch shuffles the examples with (seed, epoch) and
   packs them first-fit into rows of exactly `seq_len` tokens. Positions restart at 0 at
   every example, which the model reads as a new sequence (`packed_causal_mask`): a token
   attends only to its own example, so packing changes the speed, never the loss. The
   row's tail is padding, its own sequence, with no loss. With `pack=False` each row holds
   one example. The order is a pure function of (seed, epoch); the position is
   (epoch, row index), so a resumed run draws exactly the batches the first run would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.tune.datasets import SFTDataError

T = TypeVar("T")

__all__ = ["PackedSFT", "SFTDataError", "SFTExample", "SFTStats", "encode_example", "encode_examples",
           "pack_first_fit", "split_examples"]

Conversation = Sequence[Mapping[str, Any]]


class ChatEncoder(Protocol):
    """What the SFT data needs of a tokenizer (lmforge's `Tokenizer` is one)."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode_chat(self, messages: Conversation, *, add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]: ...


# ============================================================================ 1-2. encoding
def encode_example(tokenizer: ChatEncoder, messages: Conversation) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation and, at each position, the next token if it is the assistant's."""
    ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return ids, labels + [IGNORE_INDEX] * bool(ids)


@dataclass(frozen=True)
class SFTExample:
    """One encoded conversation: ids and next-token labels of the same length (at most seq_len)."""

    ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], IGNORE_INDEX where no loss

    def __len__(self) -> int:
        return len(self.ids)


def encode_examples(tokenizer: ChatEncoder, conversations: Sequence[Conversation], seq_len: int
                    ) -> tuple[list[SFTExample], int, int]:
    """Encoded examples cut to `seq_len`, and how many were truncated and dropped (nothing left to learn)."""
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        ids, labels = encode_example(tokenizer, messages)
        if len(ids) > seq_len:
            # the last kept position keeps its label: the cut-off token is a real next token
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append(SFTExample(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return examples, truncated, dropped


# ============================================================================ 3. the held-out split
def conversation_text(messages: Conversation) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def hash_split(items: Sequence[T], key: Callable[[T], str], val_fraction: float, seed: int = 0, *,
               error: type[Exception] = SFTDataError) -> tuple[list[T], list[T]]:
    """(train, val): an item goes to val when a hash of (seed, key(item)) falls under `val_fraction`.

    Like `data.shards.is_validation`: stable across runs and machines, and items with one
    key land together, so a repeated example cannot leak from training into validation. If
    every item fell in val, the first one trains instead.
    """
    if not 0 <= val_fraction < 1:
        raise error(f"val_fraction must be in [0, 1), got {val_fraction}")
    train: list[T] = []
    val: list[T] = []
    for item in items:
        digest = hashlib.blake2b(f"{seed}\0{key(item)}".encode(), digest_size=8).digest()
        (val if int.from_bytes(digest, "little") / 2**64 < val_fraction else train).append(item)
    if not train and val:
        train.append(val.pop(0))
    return train, val


def split_examples(conversations: Sequence[Conversation], val_fraction: float, seed: int = 0
                   ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) of conversations, by a hash of each one's text (`hash_split`)."""
    return hash_split(conversations, conversation_text, val_fraction, seed)


# ============================================================================ 4. packing
def pack_first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices: each example, taken in `order`, goes into the first row with room.

    Searching the rows one by one costs O(rows) per example. Instead a max-tree holds,
    at each node, the most free space of any row below it (rows not yet opened are
    empty, so they sit to the right with all `capacity` free). The first row with room
    is found by walking down from the root, going left whenever the left half has room:
    O(log rows) per example, whatever the lengths.
    """
    if any(lengths[k] > capacity for k in order):
        raise SFTDataError(f"an example is longer than the row ({capacity} tokens)")
    size = 1 << max(0, len(order) - 1).bit_length()  # leaves: at most one row per example
    free = [capacity] * (2 * size)  # free[1] is the root; node i has children 2i, 2i+1; leaves from `size`
    rows: list[list[int]] = []
    for k in order:
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= lengths[k] else 2 * node + 1
        row = node - size
        if row == len(rows):  # the first row with room is a new one
            rows.append([])
        rows[row].append(k)
        free[node] -= lengths[k]
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows


@dataclass(frozen=True)
class SFTStats:
    """What the SFT data holds and how well it packs."""

    examples: int
    tokens: int  # real tokens, over all examples
    assistant_tokens: int  # positions that take a loss
    rows: int  # rows of one epoch
    seq_len: int
    truncated: int
    dropped: int

    @property
    def efficiency(self) -> float:
        """Real tokens / row tokens: the share of the model's work that is not padding."""
        return self.tokens / max(1, self.rows * self.seq_len)

    def describe(self) -> str:
        return (f"{self.examples:,} examples, {self.tokens:,} tokens ({self.assistant_tokens:,} trained on), "
                f"{self.rows:,} rows of {self.seq_len} (packing efficiency {self.efficiency:.1%}), "
                f"{self.truncated:,} truncated, {self.dropped:,} dropped")


class PackedSFT:
    """Encoded SFT examples as a resumable `BatchSource` of rows of exactly `seq_len` tokens."""

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, pad_id: int, *, seed: int = 0,
                 pack: bool = True, shuffle: bool = True, truncated: int = 0, dropped: int = 0) -> None:
        if not examples:
            why = f" ({dropped:,} dropped: no reply in the first {seq_len} tokens)" if dropped else ""
            raise SFTDataError(f"no SFT example to train on{why}")
        if max(len(e) for e in examples) > seq_len:
            raise SFTDataError(f"an example is longer than seq_len {seq_len}; encode with encode_examples")
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self.seed, self.pack, self.shuffle = seed, pack, shuffle
        self.lengths = [len(e) for e in self.examples]
        self.epoch, self.index = 0, 0
        self._rows = self._rows_for(0)
        self.stats = SFTStats(
            examples=len(self.examples), tokens=sum(self.lengths),
            assistant_tokens=int(sum((e.labels != IGNORE_INDEX).sum() for e in self.examples)),
            rows=len(self._rows), seq_len=seq_len, truncated=truncated, dropped=dropped)
        self.fingerprint = self._fingerprint()

    @classmethod
    def from_conversations(cls, tokenizer: ChatEncoder, conversations: Sequence[Conversation], seq_len: int,
                           *, seed: int = 0, pack: bool = True, shuffle: bool = True) -> PackedSFT:
        """Encode (template, assistant-only labels, truncation) and pack; pads with the pad id, else EOS."""
        examples, truncated, dropped = encode_examples(tokenizer, conversations, seq_len)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(examples, seq_len, pad_id if pad_id is not None else 0, seed=seed, pack=pack,
                   shuffle=shuffle, truncated=truncated, dropped=dropped)

    def __len__(self) -> int:
        """Rows in the current epoch."""
        return len(self._rows)

    # ------------------------------------------------------------------ rows
    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()

    def _rows_for(self, epoch: int, *, fixed: bool = False) -> list[list[int]]:
        order = list(range(len(self.examples))) if fixed else self._order(epoch)
        if not self.pack:
            return [[k] for k in order]
        return pack_first_fit(self.lengths, order, self.seq_len)

    def _row(self, members: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids, labels, positions of one row: the examples side by side, then padding."""
        ids = [self.examples[k].ids for k in members]
        labels = [self.examples[k].labels for k in members]
        positions = [np.arange(n) for n in (self.lengths[k] for k in members)]
        tail = self.seq_len - sum(self.lengths[k] for k in members)
        if tail:  # padding: its own sequence (positions from 0), never a loss
            ids.append(np.full(tail, self.pad_id, dtype=np.int64))
            labels.append(np.full(tail, IGNORE_INDEX, dtype=np.int64))
            positions.append(np.arange(tail))
        return np.concatenate(ids), np.concatenate(labels), np.concatenate(positions)

    def _batch(self, rows: list[list[int]]) -> Batch:
        ids, labels, positions = zip(*(self._row(members) for members in rows), strict=True)
        batch_positions = torch.from_numpy(np.stack(positions)) if self.pack else None
        return Batch(torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labels)), batch_positions)

    # ------------------------------------------------------------------ BatchSource
    def next_batch(self, rows: int) -> Batch:
        chosen = []
        for _ in range(rows):
            if self.index == len(self._rows):
                self.epoch, self.index = self.epoch + 1, 0
                self._rows = self._rows_for(self.epoch)
            chosen.append(self._rows[self.index])
            self.index += 1
        return self._batch(chosen)

    def first_batches(self, rows: int, max_batches: int) -> Iterator[Batch]:
        """The same rows every time (the examples in their given order, packed); the position stays."""
        fixed = self._rows_for(0, fixed=True)[:rows * max_batches]
        for begin in range(0, len(fixed), rows):
            yield self._batch(fixed[begin:begin + rows])

    # ------------------------------------------------------------------ resumable position
    def _fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=8)
        for example in self.examples:
            digest.update(np.asarray(len(example), dtype=np.int64).tobytes())
            digest.update(example.ids.tobytes())
            digest.update(example.labels.tobytes())
        return digest.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "examples": len(self.examples),
                "seq_len": self.seq_len, "pack": self.pack, "shuffle": self.shuffle,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ours = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "index")}
        theirs = {k: state.get(k) for k in ours}
        if theirs != ours:
            changed = ", ".join(f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if theirs[k] != ours[k])
            raise SFTDataError(f"the checkpoint's data position is for other SFT data ({changed}): the "
                               "conversations, tokenizer, template, seq_len, packing or seed changed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._rows = self._rows_for(self.epoch)
