"""Walking a model block by block over calibration text, as GPTQ, AWQ, Wanda and SparseGPT do.

The methods that use data all need the same thing: for each linear layer, statistics of
the inputs it sees on real text (the Hessian-like sum of x x^T, the per-channel mean |x|,
the per-channel sum of x^2 and max |x|, and a sample of input rows). Computing them for all layers at
once would use inputs produced by the *original* earlier layers; instead the walk is
sequential:

```
x = the calibration tokens' embeddings (the input of block 0)
for each block:
    run the block on x, recording every linear layer's inputs   (hooks)
    visit(block, statistics): the method changes the block's weights in place
    x = the *changed* block's output                            (the next block's input)
```

so each block is calibrated on the inputs it will really receive once every block
before it has been changed (rounded by GPTQ, pruned; for AWQ, scaled and clipped, the
rounding coming after the walk), and errors do not compound unseen. Memory: the
calibration activations ([samples, tokens, d_model], 151 MB for 128 x 512 x 576 in fp32)
plus one block's statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.model.transformer import Block, Transformer


@dataclass
class LinearInputs:
    """What the calibration tokens fed one linear layer."""

    tokens: int = 0
    xtx: torch.Tensor | None = None  # sum of x x^T over tokens [in, in] (GPTQ's and SparseGPT's H, unscaled)
    abs_sum: torch.Tensor | None = None  # sum of |x| per input channel: AWQ's activation scale
    sq_sum: torch.Tensor | None = None  # sum of x^2 per input channel: Wanda's ||X_j||^2
    abs_max: torch.Tensor | None = None  # max |x| per input channel: SmoothQuant's activation range
    samples: list[torch.Tensor] = field(default_factory=list)  # some input rows, for AWQ's searches

    def hessian(self) -> torch.Tensor:
        """H = 2/n X^T X, the Hessian of the layer's squared output error in its weights (per row)."""
        return self.xtx * (2.0 / max(self.tokens, 1))

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)

    @property
    def seen(self) -> bool:
        """Whether any calibration token reached the layer (a mixture-of-experts expert may get none)."""
        return self.tokens > 0


class _Recorder:
    """A forward hook accumulating one layer's `LinearInputs`."""

    def __init__(self, stats: LinearInputs, *, xtx: bool, max_samples: int,
                 generator: torch.Generator) -> None:
        self.stats, self.xtx, self.max_samples, self.generator = stats, xtx, max_samples, generator

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        s = self.stats
        if s.abs_sum is None:
            s.abs_sum, s.sq_sum, s.abs_max = (x.new_zeros(x.shape[1]) for _ in range(3))
            if self.xtx:
                s.xtx = x.new_zeros(x.shape[1], x.shape[1])
        s.abs_sum += x.abs().sum(0)
        s.sq_sum += x.square().sum(0)
        torch.maximum(s.abs_max, x.abs().amax(0), out=s.abs_max)
        if self.xtx:
            s.xtx.addmm_(x.T, x)
        s.tokens += x.shape[0]
        have = sum(r.shape[0] for r in s.samples)
        if have < self.max_samples:
            take = torch.randperm(x.shape[0], generator=self.generator)[:self.max_samples - have]
            s.samples.append(x[take])


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by their name inside it (attn.q_proj, mlp.down_proj, ...); MoE routers
    stay out (tiny, and routing is sensitive)."""
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and not n.endswith("router")}


class _Captured(Exception):
    pass


@torch.no_grad()
def first_block_inputs(model: Transformer, calibration: torch.Tensor,
                       batch_size: int) -> list[tuple[torch.Tensor, Any, Any]]:
    """(x, rope, mask) for each batch of calibration rows: block 0's input and what every block is
    called with (rope tables have the batch's own size: the last batch may be smaller)."""
    captured: dict[str, tuple] = {}

    def grab(module, args):
        captured["args"] = args
        raise _Captured

    handle = model.blocks[0].register_forward_pre_hook(grab)
    xs = []
    try:
        for start in range(0, calibration.shape[0], batch_size):
            try:
                model(calibration[start:start + batch_size])
            except _Captured:
                x, rope, mask, _cache = captured["args"]
                xs.append((x, rope, mask))
    finally:
        handle.remove()
    return xs


class BlockInputs(dict):
    """name -> `LinearInputs` of one block's linear layers, and `refresh(names)`: record those layers'
    inputs again with the block as it is now (GPTQ's "true sequential" order: o_proj calibrated on
    what the already-rounded q/k/v produce, down_proj on what the rounded gate/up produce)."""

    def __init__(self, block: Block, batches: list, *, xtx: bool, max_samples: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.block, self.batches = block, batches
        self.options = dict(xtx=xtx, max_samples=max_samples, generator=generator)
        self.refresh(list(linear_layers(block)))

    def refresh(self, names: list[str]) -> None:
        layers = linear_layers(self.block)
        for name in names:
            self[name] = LinearInputs()
        hooks = [layers[name].register_forward_hook(_Recorder(self[name], **self.options)) for name in names]
        try:
            for x, rope, mask in self.batches:
                self.block(x, rope, mask, None)
        finally:
            for hook in hooks:
                hook.remove()


Visit = Callable[[int, Block, BlockInputs], None]


@torch.no_grad()
def walk_blocks(model: Transformer, calibration: torch.Tensor, visit: Visit, *, xtx: bool = True,
                max_samples: int = 0, batch_size: int = 8, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> None:
    """Calibrate `model` block by block in place: `visit(index, block, inputs)` changes the block's
    weights given what its linear layers saw; the next block sees the changed block's output.

    `calibration` is [samples, tokens] ids. `xtx=False` skips the x x^T sums (magnitude-free
    methods that need only per-channel statistics); `max_samples` input rows are kept per
    layer for searches that replay inputs (AWQ)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    batches = first_block_inputs(model, calibration, batch_size)
    started = time.perf_counter()
    for index, block in enumerate(model.blocks):
        inputs = BlockInputs(block, batches, xtx=xtx, max_samples=max_samples, generator=generator)
        visit(index, block, inputs)
        batches = [(block(x, rope, mask, None)[0], rope, mask) for x, rope, mask in batches]
        if progress is not None:
            done = index + 1
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(model.blocks) - done)
            progress(f"block {done}/{len(model.blocks)} ({elapsed:.0f} s, ETA {eta:.0f} s)")
    model.train(was_training)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (attn.q_proj) under `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
