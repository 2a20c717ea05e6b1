"""Tensor parallelism: every block's matrices split across ranks (Megatron-LM's layout).

A linear layer y = x W^T can be split two ways. *Column-parallel*: each rank holds a
slice of W's output rows and computes a slice of y's features, from the whole x.
*Row-parallel*: each rank holds a slice of W's input columns, multiplies its slice of
x's features, and the partial products are summed across ranks (an all-reduce).

Chaining the two needs no communication in between: in the MLP, gate/up are
column-parallel (rank r computes hidden features r), the activation is elementwise,
and down is row-parallel (rank r contracts exactly its hidden features), so one
all-reduce per MLP. In attention, q/k/v are column-parallel along whole heads (rank r
owns heads r·H/N ... ), attention is per head, and o is row-parallel: one all-reduce.
In the backward pass the mirror image holds: one all-reduce where the block's input
gradient is assembled. Norms, embeddings and the head stay whole on every rank.

Code: `torch.distributed.tensor.parallel.parallelize_module` with `ColwiseParallel` /
`RowwiseParallel` over each block; `Attention.forward` reads its local head count from
the projected width, so the same module runs on a slice of the heads.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.train.parallel.base import ParallelError
from lmforge.train.parallel.sharding import DTensorParallel


def block_plan(config: Any) -> dict[str, Any]:
    """Which projection of a block splits how: column-parallel in, row-parallel out."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {
        "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
    }
    if config.mlp == "swiglu":
        plan["mlp.gate_proj"] = ColwiseParallel()
    return plan


def check_splittable(config: Any, ranks: int) -> None:
    """Heads and MLP width must divide evenly; features that mix all heads are not split here."""
    problems = [f"{what} ({count}) is not a multiple of parallel.tensor ({ranks})"
                for what, count in (("model.n_heads", config.n_heads), ("model.n_kv_heads", config.kv_heads),
                                    ("model.d_ff", config.d_ff)) if count % ranks]
    if config.n_experts:
        problems.append("Mixture-of-Experts layers are not tensor-parallel here")
    if config.position == "alibi":
        problems.append("ALiBi biases are built for all heads at once, not per rank")
    if problems:
        raise ParallelError("tensor parallelism cannot split this model: " + "; ".join(problems))


class TensorParallel(DTensorParallel):
    """Every rank sees the same batch and computes its slice of each block; the loss is the same on all."""

    name = "tensor parallel"

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        check_splittable(model.config, self.world)
        mesh = init_device_mesh(self.device.type, (self.world,))
        plan = block_plan(model.config)
        for block in model.blocks:
            parallelize_module(block, mesh, plan)
        return model
