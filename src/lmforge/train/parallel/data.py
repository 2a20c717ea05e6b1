"""Data parallelism: every rank trains on 1/N of every global batch.

- `DDPParallel` (data parallel): every rank holds the whole model and computes its share
  of the batch; the gradients are averaged by an all-reduce during the last backward.
- `FSDPParallel` (fully sharded data parallel, `fully_shard`): the same arithmetic, but
  each rank stores only 1/N of every weight, gradient and optimizer moment; a layer's
  full weights are all-gathered just before it runs and freed after.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from lmforge.train.batch import Batch, BatchSource
from lmforge.train.objectives import Objective
from lmforge.train.parallel.base import Autocast, Parallel, ParallelError
from lmforge.train.parallel.sharding import DTensorParallel


class RankShare:
    """Each rank's rows of the global batch: draw `world * rows` windows in the global order, keep ours.

    Every rank reads the same global order (the data position stays one global number,
    so a checkpoint resumes at any world size) and keeps rows [rank * rows, (rank+1) * rows).
    Reading the others' rows costs a memory copy of token ids, nothing next to a forward pass.
    """

    def __init__(self, windows: BatchSource, rank: int, world: int) -> None:
        self.windows, self.rank, self.world = windows, rank, world

    def next_batch(self, rows: int) -> Batch:
        batch = self.windows.next_batch(rows * self.world)
        return batch.slice(self.rank * rows, (self.rank + 1) * rows)


class DataParallel(Parallel):
    """What DDP and FSDP share: each rank trains on 1/N of every global batch."""

    def local_plan(self, micro_batch: int, accumulation: int) -> tuple[int, int]:
        sequences = micro_batch * accumulation  # per optimizer step, over all ranks
        if sequences % self.world:
            raise ParallelError(f"{sequences} sequences per step (train.batch_tokens / train.seq_len) do not "
                                f"split evenly over {self.world} data-parallel ranks")
        per_rank = sequences // self.world
        local = min(micro_batch, per_rank)
        if per_rank % local:
            raise ParallelError(f"each of the {self.world} ranks gets {per_rank} sequences per step, not a "
                                f"multiple of train.micro_batch ({micro_batch}); change train.micro_batch or "
                                "train.batch_tokens")
        return local, per_rank // local

    def rank_batches(self, windows: BatchSource) -> RankShare:
        return RankShare(windows, self.rank, self.world)

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)  # a sum: gloo has no average
        return values / self.world

    @torch.no_grad()
    def eval_loss(self, objective: Objective, model: nn.Module, batch: Batch,
                  autocast: Autocast) -> torch.Tensor:
        """This rank's rows of the batch, weighted so that `global_mean` gives the batch's mean.

        A rank whose share is empty (a short last batch) still runs one row with weight 0:
        under FSDP a forward is a collective that every rank must join.
        """
        rows = batch.rows
        lo, hi = rows * self.rank // self.world, rows * (self.rank + 1) // self.world
        mine = batch.slice(lo, hi) if hi > lo else batch.slice(0, 1)
        ce = super().eval_loss(objective, model, mine, autocast)
        return ce * ((hi - lo) * self.world / rows)


class DDPParallel(DataParallel):
    """DistributedDataParallel: the whole model on every rank, gradients averaged in the last backward."""

    name = "DDP"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        return self.ddp

    def forward_backward(self, objective: Objective, model: nn.Module, batch: Batch, accum: int,
                         autocast: Autocast, last: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # no_sync: accumulate locally; only the last micro-batch's backward all-reduces the summed gradients
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            return super().forward_backward(objective, model, batch, accum, autocast, last)


class FSDPParallel(DTensorParallel, DataParallel):
    """FSDP2 (`fully_shard`): each block's weights, gradients and optimizer state sharded over the ranks."""

    name = "FSDP"

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        # one unit per block: its weights are gathered just before it runs and freed after; the root
        # unit holds what is left (embedding, final norm, head)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
