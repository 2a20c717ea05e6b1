"""The single process, and the hooks every parallel strategy overrides.

The trainer talks to a `Parallel` object at each point where the strategies differ:
which rows of the batch this rank computes, how a forward/backward runs, how a loss
becomes the global mean, how the gradient norm is measured, how a checkpoint is
gathered and scattered. `Parallel` itself is plain single-process training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.train.batch import Batch, BatchSource
from lmforge.train.checkpoint import (
    ModelStore,
    load_model_state,
    read_training_checkpoint,
    save_training_checkpoint,
)
from lmforge.train.objectives import Objective

Autocast = Callable[[], contextlib.AbstractContextManager]


class ParallelError(ValueError):
    """A parallel layout that cannot run: degrees that do not match the processes, an unsplittable model."""


@dataclass
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"  # data parallelism over the ranks torchrun starts
    tensor: int = 1  # tensor-parallel ranks: each block's matrices split across them
    pipeline: int = 1  # pipeline stages: the layer stack split across them
    schedule: Literal["gpipe", "1f1b"] = "1f1b"  # pipeline schedule
    microbatches: int = 0  # pipeline micro-batches per step; 0: one per train.micro_batch


class Parallel:
    """One process: every hook is plain single-process training. Subclasses spread the work over ranks."""

    name = "single process"

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.device, self.rank, self.world = device, rank, world
        self.owns_group = False  # whether `close` ends the process group (only if `init_parallel` began it)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes metrics, plots and checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------------ building
    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard or split `model` in place; returns the module whose parameters the optimizer gets."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the trainer calls forward on (DDP puts its gradient hooks around it here)."""
        return model

    def local_plan(self, micro_batch: int, accumulation: int) -> tuple[int, int]:
        """(sequences per forward, forwards per optimizer step) on this rank."""
        return micro_batch, accumulation

    def rank_batches(self, windows: BatchSource) -> Any:
        """What this rank draws its training rows from: an object with `next_batch(rows)`."""
        return windows

    # ------------------------------------------------------------------ one step
    def forward_backward(self, objective: Objective, model: nn.Module, batch: Batch, accum: int,
                         autocast: Autocast, last: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch, its loss divided by `accum`; (loss, metrics) detached.

        `last` marks the step's final micro-batch, where data parallelism syncs gradients.
        """
        with autocast():
            loss, metrics = objective.loss(model, batch)
        (loss / accum).backward()
        return loss.detach(), metrics

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-rank means of equal shares -> the mean over the whole batch, identical on every rank."""
        return values

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to a global norm of `max_norm`; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    @torch.no_grad()
    def eval_loss(self, objective: Objective, model: nn.Module, batch: Batch,
                  autocast: Autocast) -> torch.Tensor:
        """Mean cross-entropy of one validation batch (after `global_mean`)."""
        with autocast():
            loss, metrics = objective.loss(model, batch)
        return metrics.get("ce", loss).float()

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model state dict, optimizer state dict) in the single-process layout; complete on rank 0.

        Every rank must call it: for sharded strategies it is a collective.
        """
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        """Put a single-process state into this rank's (possibly sharded) model and optimizer."""
        load_model_state(model, model_state)
        optimizer.load_state_dict(optimizer_state)

    def save_checkpoint(self, checkpoints: Path, step: int, model: nn.Module,
                        optimizer: torch.optim.Optimizer, state: dict[str, Any], *, keep: int,
                        tokenizer: Any, store: ModelStore | None = None) -> Path | None:
        """Gather the full state (all ranks), write it (rank 0), wait for the write; the folder on rank 0."""
        model_state, optimizer_state = self.full_state(model, optimizer)
        folder = None
        if self.is_main:
            folder = save_training_checkpoint(checkpoints, step, model_state, optimizer_state, state,
                                              keep=keep, tokenizer=tokenizer, config=model.config,
                                              store=store)
        self.barrier()  # nobody trains on (or reads) past a checkpoint that is still being written
        return folder

    def load_checkpoint(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        store: ModelStore | None = None) -> dict:
        """Restore weights, optimizer and RNG from a (single-process layout) checkpoint; its state.json."""
        model_state, optimizer_state, state = read_training_checkpoint(folder, model.config, store)
        self.load_full_state(model, optimizer, model_state, optimizer_state)
        return state

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
