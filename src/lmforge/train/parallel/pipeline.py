"""Pipeline parallelism: the layer stack cut into stages, one per rank, micro-batches flowing through.

Stage 0 holds the embedding and the first layers, the last stage the final layers, the
final norm and the head; each sends its activations [b, T, d] to the next and receives
their gradients back. Run naively, only one stage works at a time. Cutting the step's
batch into m micro-batches lets stage 0 start micro-batch 2 while stage 1 runs
micro-batch 1. With p stages, each step still has a fill and a drain where some stages
idle: the *bubble*, a fraction (p - 1) / (m + p - 1) of the step. GPipe runs all m
forwards, then all m backwards (activations of m micro-batches alive at once); 1F1B
alternates one forward and one backward once the pipe is full, so a stage holds at most
p micro-batches' activations, with the same bubble.

Here the step's micro-batches are the trainer's accumulation micro-batches (one per
`train.micro_batch`, or `parallel.microbatches`), so the global batch and the loss are
exactly those of one process. The schedules are torch's (`torch.distributed.pipelining`).

Tied embeddings (the head reuses the input embedding) span the first and last stage:
the last stage keeps a copy, and after each backward the two gradients are summed
across the two ranks, so both copies take identical optimizer steps (Megatron-LM's way).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.model.layers.linear import linear
from lmforge.model.transformer import Transformer
from lmforge.train.batch import Batch
from lmforge.train.objectives import CausalLMObjective, Objective, next_token_loss
from lmforge.train.parallel.base import Autocast, Parallel, ParallelError
from lmforge.train.parallel.sharding import (
    by_index,
    by_name,
    clip_grad_norm_across_ranks,
    optimizer_param_names,
)


def stage_layers(n_layers: int, stage: int, stages: int) -> range:
    """The blocks of `stage`: contiguous, as even as possible (earlier stages get the extra ones)."""
    base, extra = divmod(n_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class StageModule(nn.Module):
    """One stage's part of a `Transformer`, under the parameter names it has there.

    Keeping the names ("blocks.3.attn.q_proj.weight", "embed.weight") is what lets the
    stages' state dicts be merged into one ordinary checkpoint. Input: token ids on the
    first stage, activations [b, T, d] elsewhere; output: activations, or logits on the last.
    """

    def __init__(self, model: Transformer, stage: int, stages: int) -> None:
        super().__init__()
        config = model.config
        self.config = config
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        if self.is_first:
            self.embed = model.embed
            if config.position == "learned":
                self.pos_embed = model.pos_embed
            self.embed_dropout = model.embed_dropout
        if config.position == "rope":
            self.rotary = model.rotary
        layers = stage_layers(config.n_layers, stage, stages)
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if self.is_last:
            self.final_norm = model.final_norm
            if config.tie_embeddings:
                self.embed = model.embed  # the head's copy of the tied embedding (see _sync_tied_gradient)
            else:
                self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        if self.is_first:
            x = self.embed(x)
            if self.config.position == "learned":
                x = x + self.pos_embed(positions)
            x = self.embed_dropout(x)
        rope = self.rotary(positions) if self.config.position == "rope" else None
        # the model's own mask rule (None: plain causal), which reads nothing but `config`
        mask = Transformer._mask(self, positions, None, x.dtype, plain_causal=True)  # type: ignore[arg-type]
        for block in self.blocks.values():
            x, _ = block(x, rope, mask, None)
        if not self.is_last:
            return x
        x = self.final_norm(x)
        return linear(x, self.embed.weight) if self.config.tie_embeddings else self.lm_head(x)


class PipelineParallel(Parallel):
    """Each rank one stage; every step's batch goes through the pipeline in micro-batches."""

    name = "pipeline parallel"

    def __init__(self, device: torch.device, rank: int, world: int, *, schedule: str = "1f1b",
                 microbatches: int = 0) -> None:
        super().__init__(device, rank, world)
        self.schedule_name, self.microbatches = schedule, microbatches
        self.is_first, self.is_last = rank == 0, rank == world - 1
        self.schedule: Any = None
        self.chunks = 0

    # ------------------------------------------------------------------ building
    def prepare(self, model: nn.Module) -> nn.Module:
        config = model.config
        if config.n_layers < self.world:
            raise ParallelError(f"parallel.pipeline ({self.world}) exceeds model.n_layers "
                                f"({config.n_layers}): every stage needs at least one block")
        if config.n_experts:
            raise ParallelError("pipeline parallelism does not carry the Mixture-of-Experts auxiliary loss "
                                "between stages")
        # the full model's parameter order: the order a single-process optimizer numbers them in
        self.canonical = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        self.stage_module = StageModule(model, self.rank, self.world)
        self.tied = config.tie_embeddings
        # every rank must take part in creating a group, members or not
        self.tied_group = dist.new_group([0, self.world - 1]) if self.tied else None
        return self.stage_module

    def local_plan(self, micro_batch: int, accumulation: int) -> tuple[int, int]:
        """The whole step's batch in one pipeline pass, cut into `chunks` micro-batches."""
        sequences = micro_batch * accumulation
        chunks = self.microbatches or accumulation
        if sequences % chunks:
            raise ParallelError(f"parallel.microbatches ({chunks}) must divide the {sequences} sequences "
                                "of a step")
        if self.schedule_name == "1f1b" and chunks < self.world:
            raise ParallelError(f"the 1F1B schedule needs at least as many micro-batches ({chunks}) as "
                                f"stages ({self.world}): raise parallel.microbatches or use "
                                "parallel.schedule: gpipe")
        self.chunks = chunks
        return sequences, 1

    def _build_schedule(self) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(self.stage_module, self.rank, self.world, self.device)
        kind = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
        # scale_grads: each micro-batch's loss is a mean, so the summed gradients are divided by their count
        return kind(stage, self.chunks, loss_fn=next_token_loss, scale_grads=True)

    # ------------------------------------------------------------------ one step
    def forward_backward(self, objective: Objective, model: nn.Module, batch: Batch, accum: int,
                         autocast: Autocast, last: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(objective, CausalLMObjective):
            raise ParallelError("pipeline parallelism trains the next-token objective only")
        _check_unpacked(batch)
        if self.schedule is None:
            self.schedule = self._build_schedule()
        inputs, targets = batch.input_ids, batch.labels
        losses: list[torch.Tensor] = []
        with autocast():
            if self.is_first:
                self.schedule.step(inputs)
            elif self.is_last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        self._sync_tied_gradient()
        loss = torch.stack(losses).mean().detach() if self.is_last else torch.zeros((), device=self.device)
        return loss, {"ce": loss}

    def _sync_tied_gradient(self) -> None:
        """First stage: the embedding's gradient; last stage: the head's. Both become their sum."""
        if self.tied and (self.is_first or self.is_last):
            dist.all_reduce(self.stage_module.embed.weight.grad, group=self.tied_group)

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The losses live on the last stage: every rank gets its copy."""
        values = values.clone()
        dist.broadcast(values, src=self.world - 1)
        return values

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        tied_copy = self.stage_module.embed.weight if self.tied and self.is_last else None
        return clip_grad_norm_across_ranks(model.parameters(), max_norm,
                                           lambda p: "copy" if p is tied_copy else "own", self.device)

    @torch.no_grad()
    def eval_loss(self, objective: Objective, model: nn.Module, batch: Batch,
                  autocast: Autocast) -> torch.Tensor:
        """The stages one after another (a handful of evaluation batches need no pipelining)."""
        _check_unpacked(batch)
        inputs, targets = batch.input_ids, batch.labels
        if self.is_first:
            x = inputs
        else:
            x = torch.empty(*inputs.shape, self.stage_module.config.d_model, device=self.device)
            dist.recv(x, src=self.rank - 1)
        with autocast():
            out = model(x)
        if not self.is_last:
            dist.send(out.float().contiguous(), dst=self.rank + 1)
            return torch.zeros((), device=self.device)
        return next_token_loss(out, targets)

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every stage's weights and optimizer state, by parameter name, merged on rank 0."""
        model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        named = by_name(optimizer.state_dict(), optimizer_param_names(model, optimizer))
        named["state"] = {name: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
                          for name, entries in named["state"].items()}
        pieces: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object((model_state, named), pieces, dst=0)
        if pieces is None:
            return {}, {}
        merged_model: dict[str, torch.Tensor] = {}
        merged_state: dict[str, Any] = {}
        for stage_model, stage_optimizer in pieces:
            for key, value in stage_model.items():
                merged_model.setdefault(key, value)  # the tied embedding: both copies are equal
            for key, value in stage_optimizer["state"].items():
                merged_state.setdefault(key, value)
        hyper = {_label(g, i): g for p in pieces for i, g in enumerate(p[1]["param_groups"])}
        groups = self._merge_group_names([_labelled_names(p[1]["param_groups"]) for p in pieces])
        full = {"state": merged_state,
                "param_groups": [{**hyper[label], "params": names} for label, names in groups]}
        return merged_model, by_index(full)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        with torch.no_grad():
            model.load_state_dict({key: model_state[key] for key in model.state_dict()})
        mine = optimizer_param_names(model, optimizer)
        ours = [(_label(g, i), names) for i, (g, names) in enumerate(zip(optimizer.param_groups, mine))]
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, ours)
        full = self._merge_group_names(everyone)
        named = by_name(optimizer_state, [names for _, names in full])
        saved = {_label(g, i): g for i, g in enumerate(named["param_groups"])}
        state = {name: named["state"][name] for names in mine for name in names if name in named["state"]}
        local = {"state": state, "param_groups": [{**saved[label], "params": names} for label, names in ours]}
        optimizer.load_state_dict(by_index(local))

    def _merge_group_names(self, per_stage: list[list[tuple[Any, list[str]]]]) -> list[tuple[Any, list[str]]]:
        """Each optimizer group's parameter names over all stages, in the full model's order."""
        merged: dict[Any, set[str]] = {}
        for groups in per_stage:
            for label, names in groups:
                merged.setdefault(label, set()).update(names)
        return [(label, sorted(names, key=self.canonical.__getitem__)) for label, names in merged.items()]


def _check_unpacked(batch: Batch) -> None:
    if batch.positions is not None:
        raise ParallelError("pipeline parallelism passes only hidden states between stages, not the "
                            "document positions of packed rows: use data or tensor parallelism here")


def _label(group: dict[str, Any], position: int) -> Any:
    """An optimizer group's identity across stages: its name (build_optimizer sets one), else its position."""
    return group.get("name", position)


def _labelled_names(groups: list[dict[str, Any]]) -> list[tuple[Any, list[str]]]:
    return [(_label(g, i), list(g["params"])) for i, g in enumerate(groups)]
