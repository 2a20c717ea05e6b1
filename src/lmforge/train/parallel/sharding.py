"""What sharded strategies share: the gradient norm over pieces held by different ranks, and
gathering/scattering a sharded model's state to and from the single-process layout."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.train.checkpoint import ResumeError
from lmforge.train.parallel.base import Parallel

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


class DTensorParallel(Parallel):
    """What strategies whose parameters are DTensors sharded over the ranks (FSDP, tensor
    parallel) share: the gradient norm over the pieces, and gathering/scattering state."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_across_ranks(model.parameters(), max_norm, shard_holding, self.device)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return gather_dtensor_state(model, optimizer)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        scatter_dtensor_state(model, optimizer, model_state, optimizer_state)
