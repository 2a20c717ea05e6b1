"""`Batch`: what every objective consumes, whatever made it (token shards, chat data, pairs).

A row is `input_ids` and, at each position, the token the model should predict there
(`labels`), or `IGNORE_INDEX` where no loss is taken: the prompt of a chat example,
padding, the seam between packed examples. Pretraining windows of T+1 tokens become
inputs t[0..T-1] and labels t[1..T]; an SFT row masks everything but the assistant's
tokens. The loss is then always the mean over the labelled positions, so pretraining
and SFT run through the same objective and the same loop.

`positions` is the position of each token within its own document. When several
examples are packed into one row, positions restart at 0 where each example begins,
and the model treats every restart as a new sequence (no attention across examples;
see `Transformer.forward`). Without packing it is None (0..T-1 for every row).

`extras` carries what other objectives need per row (chosen/rejected pairs, rewards,
teacher logits), sliced and moved along with the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100  # PyTorch's cross_entropy default: labels equal to it take no loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64: the next token at each position, or IGNORE_INDEX
    positions: torch.Tensor | None = None  # [B, T] position within its document (packing), or None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, ...] each

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.labels.shape != self.input_ids.shape:
            raise ValueError(f"a Batch needs input_ids and labels of one shape [rows, tokens], got "
                             f"{tuple(self.input_ids.shape)} and {tuple(self.labels.shape)}")
        if self.positions is not None and self.positions.shape != self.input_ids.shape:
            raise ValueError(f"positions {tuple(self.positions.shape)} must match input_ids "
                             f"{tuple(self.input_ids.shape)}")

    @classmethod
    def from_windows(cls, windows: torch.Tensor) -> Batch:
        """Windows of T+1 tokens [B, T+1] -> inputs t[:T] and next-token labels t[1:]."""
        return cls(input_ids=windows[:, :-1], labels=windows[:, 1:])

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens fed to the model (rows x length), padding included."""
        return self.input_ids.numel()

    def loss_tokens(self) -> torch.Tensor:
        """How many positions take a loss (a tensor: counting on the device needs no sync)."""
        return (self.labels != IGNORE_INDEX).sum()

    def slice(self, start: int, stop: int) -> Batch:
        """Rows [start, stop): a rank's share of the batch, or a micro-batch."""
        return Batch(self.input_ids[start:stop], self.labels[start:stop],
                     None if self.positions is None else self.positions[start:stop],
                     {k: v[start:stop] for k, v in self.extras.items()})

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(move(self.input_ids), move(self.labels),
                     None if self.positions is None else move(self.positions),
                     {k: move(v) for k, v in self.extras.items()})


class BatchSource(Protocol):
    """Where the trainer draws batches from: token windows, packed chat examples, preference pairs.

    Its position must be a plain dict, so that a checkpoint resumes with exactly the
    batches an uninterrupted run would have drawn.
    """

    def next_batch(self, rows: int) -> Batch:
        """The next `rows` rows of training data."""
        ...

    def first_batches(self, rows: int, max_batches: int) -> Iterator[Batch]:
        """The same fixed batches every time (for evaluation), without moving the position."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
