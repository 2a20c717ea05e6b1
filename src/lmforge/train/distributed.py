"""Training on several processes started by `torchrun`: the process group and data parallelism.

`torchrun --nproc_per_node N -m lmforge.cli pretrain ...` starts N copies of the same
program; each learns its rank (0..N-1) and the world size N from environment variables
and joins one process group (gloo on CPU, NCCL on CUDA) to exchange tensors.

The trainer talks to a `Parallel` object at each point where the strategies differ:
which rows of the batch this rank computes, how a forward/backward runs, how a loss
becomes the global mean, how the gradient norm is measured, how a checkpoint is
gathered and scattered. The base class is the single process; the strategies are

- `DDPParallel` (data parallel): every rank holds the whole model and computes its share
  of the batch; the gradients are averaged by an all-reduce during the last backward.
- `FSDPParallel` (fully sharded data parallel, `fully_shard`): the same arithmetic, but
  each rank stores only 1/N of every weight, gradient and optimizer moment; a layer's
  full weights are all-gathered just before it runs and freed after.
- `TensorParallel` (train/tensor_parallel.py): every matrix of a block split across ranks.
- `PipelineParallel` (train/pipeline_parallel.py): the layer stack split into stages.

Whatever the strategy, a checkpoint has the single-process layout (a full state dict in
the HF folder, the optimizer state keyed by parameter index), so it resumes in one
process or at any world size.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.train.checkpoint import ResumeError, read_training_checkpoint, save_training_checkpoint
from lmforge.train.data import TokenWindows
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


# ---------------------------------------------------------------------------------- the single process
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

    def rank_batches(self, windows: TokenWindows) -> Any:
        """What this rank draws its training rows from: an object with `next_batch(rows)`."""
        return windows

    # ------------------------------------------------------------------ one step
    def forward_backward(self, objective: Objective, model: nn.Module, batch: torch.Tensor, accum: int,
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
    def eval_loss(self, objective: Objective, model: nn.Module, batch: torch.Tensor,
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
        with torch.no_grad():
            model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def save_checkpoint(self, checkpoints: Path, step: int, model: nn.Module,
                        optimizer: torch.optim.Optimizer, state: dict[str, Any], *, keep: int,
                        tokenizer: Any) -> Path | None:
        """Gather the full state (all ranks), write it (rank 0), wait for the write; the folder on rank 0."""
        model_state, optimizer_state = self.full_state(model, optimizer)
        folder = None
        if self.is_main:
            folder = save_training_checkpoint(checkpoints, step, model_state, optimizer_state, state,
                                              keep=keep, tokenizer=tokenizer, config=model.config)
        self.barrier()  # nobody trains on (or reads) past a checkpoint that is still being written
        return folder

    def load_checkpoint(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore weights, optimizer and RNG from a (single-process layout) checkpoint; its state.json."""
        model_state, optimizer_state, state = read_training_checkpoint(folder, model.config)
        self.load_full_state(model, optimizer, model_state, optimizer_state)
        return state

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------- data parallelism
class RankShare:
    """Each rank's rows of the global batch: draw `world * rows` windows in the global order, keep ours.

    Every rank reads the same global order (the data position stays one global number,
    so a checkpoint resumes at any world size) and keeps rows [rank * rows, (rank+1) * rows).
    Reading the others' rows costs a memory copy of token ids, nothing next to a forward pass.
    """

    def __init__(self, windows: TokenWindows, rank: int, world: int) -> None:
        self.windows, self.rank, self.world = windows, rank, world

    def next_batch(self, rows: int) -> torch.Tensor:
        batch = self.windows.next_batch(rows * self.world)
        return batch[self.rank * rows:(self.rank + 1) * rows]


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

    def rank_batches(self, windows: TokenWindows) -> RankShare:
        return RankShare(windows, self.rank, self.world)

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)  # a sum: gloo has no average
        return values / self.world

    @torch.no_grad()
    def eval_loss(self, objective: Objective, model: nn.Module, batch: torch.Tensor,
                  autocast: Autocast) -> torch.Tensor:
        """This rank's rows of the batch, weighted so that `global_mean` gives the batch's mean.

        A rank whose share is empty (a short last batch) still runs one row with weight 0:
        under FSDP a forward is a collective that every rank must join.
        """
        rows = batch.shape[0]
        lo, hi = rows * self.rank // self.world, rows * (self.rank + 1) // self.world
        mine = batch[lo:hi] if hi > lo else batch[:1]
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

    def forward_backward(self, objective: Objective, model: nn.Module, batch: torch.Tensor, accum: int,
                         autocast: Autocast, last: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # no_sync: accumulate locally; only the last micro-batch's backward all-reduces the summed gradients
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            return super().forward_backward(objective, model, batch, accum, autocast, last)


class FSDPParallel(DataParallel):
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

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_across_ranks(model.parameters(), max_norm, shard_holding, self.device)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return gather_dtensor_state(model, optimizer)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        scatter_dtensor_state(model, optimizer, model_state, optimizer_state)


# ---------------------------------------------------------------------------------- gradient norm
Holding = Literal["own", "shared", "copy"]


def shard_holding(p: nn.Parameter) -> Holding:
    """A DTensor sharded over the ranks is a piece only this rank holds; the rest every rank holds alike."""
    from torch.distributed.tensor import DTensor

    sharded = isinstance(p, DTensor) and any(placement.is_shard() for placement in p.placements)
    return "own" if sharded else "shared"


@torch.no_grad()
def clip_grad_norm_across_ranks(params: Iterable[nn.Parameter], max_norm: float,
                                holding: Callable[[nn.Parameter], Holding],
                                device: torch.device) -> torch.Tensor:
    """The global gradient norm when ranks hold different pieces of the gradient; clips to `max_norm`.

    ||g||^2 is a sum of squares. Each rank sums the squares of the pieces only it holds
    ("own": a shard, a pipeline stage's layers) and one all-reduce adds those up; the
    squares of gradients every rank holds alike ("shared") are added once; a "copy" that
    another rank already counts (pipeline's tied head) is not counted. Every rank then
    scales all its gradients by the same factor, as `torch.nn.utils.clip_grad_norm_` does.
    """
    from torch.distributed.tensor import DTensor

    own_sq = torch.zeros((), device=device)
    shared_sq = torch.zeros((), device=device)
    grads = []
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # this rank's piece, in place
        grads.append(grad)
        kind = holding(p)
        if kind == "own":
            own_sq += grad.float().square().sum()
        elif kind == "shared":
            shared_sq += grad.float().square().sum()
    dist.all_reduce(own_sq)
    total = (own_sq + shared_sq).sqrt()
    if math.isfinite(max_norm):
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(factor.to(grad.dtype))
    return total


# ---------------------------------------------------------------------------------- checkpoint state
def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group, in the group's order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def by_index(named_state: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name -> torch's layout (keys 0..n-1 in group order).

    torch numbers parameters through the groups in order; a single-process optimizer over
    the same model has the same groups, so the numbers match its own `state_dict()`.
    """
    index: dict[str, int] = {}
    groups = []
    for group in named_state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    state = {index[name]: entries for name, entries in named_state["state"].items()}
    return {"state": state, "param_groups": groups}


def by_name(indexed_state: dict[str, Any], group_names: list[list[str]]) -> dict[str, Any]:
    """torch's index-keyed optimizer state -> keyed by parameter name (`group_names` from the full model)."""
    saved = indexed_state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(names) for names in group_names]:
        raise ResumeError(f"the checkpoint's optimizer has groups of {[len(g['params']) for g in saved]} "
                          f"parameters, this run's {[len(n) for n in group_names]}: another optimizer?")
    name_of = {index: name for group, names in zip(saved, group_names)
               for index, name in zip(group["params"], names)}
    return {"state": {name_of[int(i)]: entries for i, entries in indexed_state["state"].items()},
            "param_groups": [{**group, "params": names} for group, names in zip(saved, group_names)]}


def gather_dtensor_state(model: nn.Module, optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) model and optimizer state of a DTensor model, on rank 0's CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}, {}
    # the state-dict helpers name a group's parameters; the group list itself is ours (optimizer order)
    named = {"state": named["state"], "param_groups": [
        {**{k: v for k, v in group.items() if k != "params"}, "params": names}
        for group, names in zip(optimizer.param_groups, optimizer_param_names(model, optimizer))]}
    return model_state, by_index(named)


def scatter_dtensor_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
    """Each rank keeps its shards of a full single-process state (every rank passes the whole state)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    named = by_name(optimizer_state, optimizer_param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, named, options=options)


# ---------------------------------------------------------------------------------- start-up
def launched_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) when started directly."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def init_parallel(config: ParallelConfig, device: torch.device) -> Parallel:
    """Join torchrun's process group and return the strategy the config names, checked against the world."""
    rank, local_rank, world = launched_world()
    if config.tensor < 1 or config.pipeline < 1:
        raise ParallelError("parallel.tensor and parallel.pipeline must be at least 1")
    if config.microbatches < 0:
        raise ParallelError("parallel.microbatches must be 0 (one per train.micro_batch) or positive")
    wanted = [what for what, on in (("parallel.strategy", config.strategy != "none"),
                                    ("parallel.tensor", config.tensor > 1),
                                    ("parallel.pipeline", config.pipeline > 1)) if on]
    if len(wanted) > 1:
        raise ParallelError(f"{' and '.join(wanted)} are set together; lmforge runs one kind of parallelism "
                            "at a time (data, tensor or pipeline)")
    degree = config.tensor if config.tensor > 1 else config.pipeline
    if world == 1:
        if degree > 1:
            raise ParallelError(f"{wanted[0]}: {degree} needs {degree} processes; launch with "
                                f"torchrun --nproc_per_node {degree} -m lmforge.cli pretrain ...")
        return Parallel(device)  # ddp/fsdp over one process is plain training
    if degree > 1 and degree != world:
        raise ParallelError(f"{wanted[0]} is {degree} but torchrun started {world} processes: set them equal")
    if not wanted:
        raise ParallelError(f"torchrun started {world} processes but the config trains in one: set "
                            "parallel.strategy (ddp or fsdp), parallel.tensor or parallel.pipeline")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()  # a caller's group (several runs in one launch) is left to it
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    parallel: Parallel
    if config.strategy == "ddp":
        parallel = DDPParallel(device, rank, world)
    elif config.strategy == "fsdp":
        parallel = FSDPParallel(device, rank, world)
    elif config.tensor > 1:
        from lmforge.train.tensor_parallel import TensorParallel

        parallel = TensorParallel(device, rank, world)
    else:
        from lmforge.train.pipeline_parallel import PipelineParallel

        parallel = PipelineParallel(device, rank, world, schedule=config.schedule,
                                    microbatches=config.microbatches)
    parallel.owns_group = owns_group
    return parallel
