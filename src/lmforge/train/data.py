"""Training batches from token shards: windows of T+1 tokens in a seeded, resumable order.

A window of T+1 tokens gives T inputs and their T next-token targets. The window
starts are fixed (every T tokens, or every document start with `bos_align`) and each
epoch visits all of them in a permutation drawn from (seed, epoch). The order is
therefore a pure function of the seed, and the reader's position in it, (epoch, index),
is all a checkpoint needs to continue with exactly the batches an uninterrupted run
would have seen.

With a curriculum (`use_curriculum`, see train/curriculum.py) the first draws come from
the easiest windows instead, chosen by a function of (seed, draw number); the count of
windows drawn so far, `drawn`, is then part of the position too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.data.shards import TokenShard
from lmforge.train.batch import Batch


class DataError(ValueError):
    """Shards that cannot feed training (too short for one window, no documents)."""


class DrawOrder(Protocol):
    """An order for the first draws (train/curriculum.py's `Curriculum` is one)."""

    ramp_draws: int  # how many draws follow this order before ordinary epochs resume
    fingerprint: str  # what a checkpoint records, to refuse resuming under another order

    def __len__(self) -> int: ...

    def window(self, draw: int) -> int:
        """The window index of draw number `draw` (< ramp_draws)."""
        ...


class TokenWindows:
    """Windows of `seq_len + 1` tokens from `shards`; `next_batch(b)` -> a `Batch` of b rows of seq_len."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int, seed: int, *, bos_align: bool = False,
                 shuffle: bool = True) -> None:
        self.shards, self.seq_len, self.seed, self.shuffle = list(shards), seq_len, seed, shuffle
        width = seq_len + 1
        shard_ids, starts = [], []
        for i, shard in enumerate(self.shards):
            last = len(shard) - width  # the last start whose window fits in this shard
            if bos_align:
                # documents never span shards, so a window from a document start is one
                # document's beginning followed by whatever comes next in the shard
                candidates = np.asarray(shard.doc_starts, dtype=np.int64)
                candidates = candidates[candidates <= last]
            else:
                candidates = np.arange(0, last + 1, seq_len, dtype=np.int64)
            shard_ids.append(np.full(len(candidates), i, dtype=np.int64))
            starts.append(candidates)
        self.shard_ids = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        if len(self.starts) == 0:
            total = sum(len(s) for s in self.shards)
            raise DataError(f"the shards hold {total:,} tokens: not one window of {width} tokens "
                            f"(seq_len + 1){' starting at a document start' if bos_align else ''} fits")
        self.epoch, self.index = 0, 0
        self.drawn = 0  # windows handed out so far, over all epochs
        self.curriculum: DrawOrder | None = None
        self._order = self._order_for(0)

    def __len__(self) -> int:
        """Windows per epoch."""
        return len(self.starts)

    def use_curriculum(self, curriculum: DrawOrder) -> None:
        """Draw the first `curriculum.ramp_draws` windows easiest-first, then ordinary epochs."""
        if len(curriculum) != len(self.starts):
            raise DataError(f"the curriculum orders {len(curriculum)} windows, but this data has "
                            f"{len(self.starts)}")
        if self.drawn:
            raise DataError("a curriculum must be set before the first batch is drawn")
        self.curriculum = curriculum

    def _order_for(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.starts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))

    def _window(self, k: int) -> np.ndarray:
        shard = self.shards[int(self.shard_ids[k])]
        start = int(self.starts[k])
        return np.asarray(shard.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def next_batch(self, batch_size: int) -> Batch:
        rows = []
        for _ in range(batch_size):
            if self.curriculum is not None and self.drawn < self.curriculum.ramp_draws:
                rows.append(self._window(self.curriculum.window(self.drawn)))
            else:
                if self.index == len(self._order):
                    self.epoch, self.index = self.epoch + 1, 0
                    self._order = self._order_for(self.epoch)
                rows.append(self._window(int(self._order[self.index])))
                self.index += 1
            self.drawn += 1
        return Batch.from_windows(torch.from_numpy(np.stack(rows)))

    def first_batches(self, batch_size: int, max_batches: int) -> Iterator[Batch]:
        """The same fixed batches every time (for evaluation), without moving the position."""
        count = min(len(self.starts), batch_size * max_batches)
        order = self._order_for(0)[:count]
        for begin in range(0, count, batch_size):
            rows = [self._window(int(k)) for k in order[begin:begin + batch_size]]
            yield Batch.from_windows(torch.from_numpy(np.stack(rows)))

    # ------------------------------------------------------------------ resumable position
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "windows": len(self.starts),
                "drawn": self.drawn, "curriculum": self.curriculum.fingerprint if self.curriculum else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("windows") != len(self.starts) or state.get("seed") != self.seed:
            raise DataError(f"the checkpoint's data position is for {state.get('windows')} windows with "
                            f"seed {state.get('seed')}, but this data has {len(self.starts)} with seed "
                            f"{self.seed}: "
                            "the shards, seq_len, bos_align or seed changed")
        ours = self.curriculum.fingerprint if self.curriculum else None
        if state.get("curriculum") != ours:
            saved = f"curriculum {state['curriculum']}" if state.get("curriculum") else "no curriculum"
            now = f"curriculum {ours}" if ours else "none"
            raise DataError(f"the checkpoint's data position was drawn with {saved}, but this run has {now}: "
                            "the data.curriculum settings (score, scorer) or the data changed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        # checkpoints from before `drawn` existed had no curriculum: every draw was an epoch draw
        self.drawn = int(state.get("drawn", self.epoch * len(self.starts) + self.index))
        self._order = self._order_for(self.epoch)
