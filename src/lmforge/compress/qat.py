"""Quantization-aware training (QAT): fine-tune the weights through the rounding they will get.

Post-training methods choose the codes once, from the float weights (RTN) or from a
local error on calibration inputs (GPTQ, AWQ). QAT instead trains the model with the
rounding in its forward pass, so the *network's* loss decides where every weight lands:

    v   = clamp((w - m) / s, 0, 2^b - 1)      (8 bits: m = 0, v in -127..127)
    w_q = round(v) * s + m                     the exact value the engine layer will hold

Rounding has a zero gradient almost everywhere, so backward uses the straight-through
estimator (Bengio et al. 2013): d round(v) / dv := 1. Then dL/dw = dL/dw_q inside the
grid's range and 0 where the clamp cut w off: the fp32 "master" weight keeps
accumulating small updates, and its code changes once it has moved across half a step.

The grid's ranges (step s, offset m per group; per output channel at 8 bits) are either
re-fitted from each group's min and max at every step (`learn_ranges=False`, RTN's rule,
no gradient), or trained with the weights, as LSQ (Esser et al. 2020) and its asymmetric
LSQ+ do: with the same estimator, dw_q/ds = round(v) - v inside the range and the clamp
bound outside it, dw_q/dm = 0 inside and 1 outside, so a group can learn to clip a rare
outlier and spend its levels on the bulk. LSQ's gradient scale 1/sqrt(n * 2^b) is left
out: Adam normalises each parameter's step anyway. The 2-4 bit grids store s and m in
fp16, so the forward pass uses them rounded to fp16 too (identity in backward): what was
trained is what is stored.

Conversion (`to_engine`) takes those codes and ranges into the engine's `Int8Linear` /
`Int4Linear` unchanged: the converted model computes the fake-quantized model's logits
bit for bit (on the dequantizing path; the decode kernels sum in another order).

Flow of `qat_quantize`: any post-training method rounds the model first (RTN by default;
GPTQ or AWQ give QAT a better start), the head stays as `quantize` leaves it (int8 per
channel by default, not trained); every linear layer of every block becomes a
`FakeQuantLinear` (master weights: the float weights for RTN, the method's own rounded
weights for GPTQ/AWQ, so that step 0 *is* that method's model); the one `Trainer` trains
them with the causal LM objective on the given text; `to_engine` converts.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.compress.grid import Grid, GridError
from lmforge.compress.layerwise import linear_layers, set_module
from lmforge.compress.quantize import QuantizeReport, quantize_model
from lmforge.data.shards import TokenShard
from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors
from lmforge.infer.quant import Int4Linear, Int8Linear, QuantizedLinear
from lmforge.model.config import ModelConfig
from lmforge.model.layers.linear import linear
from lmforge.model.transformer import Transformer
from lmforge.train.checkpoint import ResumeError
from lmforge.train.data import TokenWindows
from lmforge.train.objectives import CausalLMObjective
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import TrainConfig, Trainer

Init = Literal["rtn", "gptq", "awq"]
INITS: tuple[str, ...] = ("rtn", "gptq", "awq")
MIN_STEP = 1e-5  # a learned step below this is held there (fp16 keeps ~3 digits down to 6e-5)
TRAINED_NAME = "qat.safetensors"


class QATError(ValueError):
    """Settings QAT cannot run with (steps, learning rates, batch against the text)."""


class _RoundThrough(torch.autograd.Function):
    """round() forward, identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _HalfThrough(torch.autograd.Function):
    """Rounded to fp16 forward (the value the int4 layer stores), identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.half().float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None,
                  grid: Grid) -> torch.Tensor:
    """w [out, groups, g] on the grid (step, offset [out, groups, 1]; offset None: symmetric), differentiable
    by the straight-through estimator in w (zero where clamped) and in step and offset."""
    low, high = (-127, 127) if grid.symmetric else (0, grid.levels)
    shifted = w if offset is None else w - offset
    q = _RoundThrough.apply((shifted / step).clamp(low, high))
    return q * step if offset is None else q * step + offset


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward uses its weight rounded on `grid`; fp32 master weights train.

    `step`/`offset` [out, in / group] are parameters with `learn_ranges`, otherwise re-fitted
    from the weight at every call (and then only buffers kept for `codes` to report)."""

    def __init__(self, weight: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, grid: Grid,
                 bias: torch.Tensor | None = None, *, learn_ranges: bool = True) -> None:
        super().__init__()
        self.grid, self.learn_ranges = grid, learn_ranges
        self.out_features, self.in_features = weight.shape
        self.group_size = grid.group_of(self.in_features)
        if step.shape != (self.out_features, self.in_features // self.group_size):
            raise GridError(f"steps of shape {tuple(step.shape)} do not fit a {self.out_features} x "
                            f"{self.in_features} weight in groups of {self.group_size}")
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        if learn_ranges:
            self.step = nn.Parameter(step.detach().float().clone())
            self.offset = None if grid.symmetric else nn.Parameter(offset.detach().float().clone())
        else:
            self.register_buffer("step", step.detach().float().clone())
            self.register_buffer("offset", None if grid.symmetric else offset.detach().float().clone())

    @classmethod
    def from_engine(cls, layer: QuantizedLinear, grid: Grid, *, master: torch.Tensor | None = None,
                    learn_ranges: bool = True) -> FakeQuantLinear:
        """Start from an engine layer's grid: its ranges, and as master weights `master` (the float weights
        it was rounded from) or its own dequantized weights. Either way the first forward is its output."""
        if isinstance(layer, Int4Linear):
            if grid.symmetric or layer.group_size != grid.group_size:
                raise GridError(f"an int4 layer in groups of {layer.group_size} is not on the {grid} grid")
            step, offset = layer.dm.float().unbind(-1)
        elif isinstance(layer, Int8Linear):
            if not grid.symmetric:
                raise GridError(f"an int8 layer is not on the {grid} grid")
            step = layer.scale.float()[:, None]
            offset = torch.zeros_like(step)
        else:
            raise GridError(f"cannot train a {type(layer).__name__} through fake quantization")
        weight = layer.dequantize() if master is None else master
        return cls(weight, step, offset, grid, layer.bias, learn_ranges=learn_ranges).to(weight.device)

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step, offset) [out, groups] as the forward pass uses them; offset None for the symmetric grid."""
        if not self.learn_ranges:
            groups = self.weight.detach().reshape(-1, self.group_size)
            step, offset = self.grid.fit(groups)
            shape = (self.out_features, -1)
            with torch.no_grad():  # kept for `codes` and the checkpoint
                self.step.copy_(step.view(shape))
                if self.offset is not None:
                    self.offset.copy_(offset.view(shape))
            return step.view(shape), None if self.grid.symmetric else offset.view(shape)
        if self.grid.symmetric:  # int8 stores its scale in fp32
            return self.step.clamp(min=1e-12), None
        return _HalfThrough.apply(self.step.clamp(min=MIN_STEP)), _HalfThrough.apply(self.offset)

    def quantized_weight(self) -> torch.Tensor:
        step, offset = self.ranges()
        w = self.weight.view(self.out_features, -1, self.group_size)
        wq = fake_quantize(w, step[..., None], None if offset is None else offset[..., None], self.grid)
        return wq.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [out, in], step and offset [out, groups]): the integers the forward pass rounds to."""
        step, offset = self.ranges()
        offset = torch.zeros_like(step) if offset is None else offset
        low, high = (-127, 127) if self.grid.symmetric else (0, self.grid.levels)
        w = self.weight.view(self.out_features, -1, self.group_size)
        q = torch.round(((w - offset[..., None]) / step[..., None]).clamp(low, high))
        return q.view(self.out_features, self.in_features), step.detach().clone(), offset.detach().clone()

    def to_engine(self) -> QuantizedLinear:
        """The engine layer holding exactly these codes and ranges."""
        return self.grid.layer(*self.codes(), self.bias).to(self.weight.device)

    def extra_repr(self) -> str:
        ranges = "learned" if self.learn_ranges else "re-fitted"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.grid.bits}, "
                f"group_size={self.group_size}, ranges={ranges}")


def add_fake_quant(model: Transformer, grid: Grid, *, masters: Mapping[str, torch.Tensor] | None = None,
                   learn_ranges: bool = True) -> int:
    """Replace every engine layer of every block (what `quantize` rounded) with a `FakeQuantLinear`;
    `masters` maps "blocks.3.attn.q_proj" to the float weight it started from. The head stays as it is."""
    count = 0
    for index, block in enumerate(model.blocks):
        for name, layer in list(block.named_modules()):
            if isinstance(layer, QuantizedLinear):
                master = (masters or {}).get(f"blocks.{index}.{name}")
                set_module(block, name, FakeQuantLinear.from_engine(layer, grid, master=master,
                                                                    learn_ranges=learn_ranges))
                count += 1
    if not count:
        raise GridError("the model's blocks hold no quantized layer to train: quantize it first")
    return count


def to_engine(model: nn.Module) -> int:
    """Convert every `FakeQuantLinear` into the engine's int8/int4 layer in place; how many."""
    fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, layer in fakes:
        set_module(model, name, layer.to_engine())
    model.requires_grad_(False)
    return len(fakes)


# ---------------------------------------------------------------------------------- training
@dataclass
class QATConfig:
    steps: int = 100
    lr: float = 1e-5  # peak learning rate of the master weights (and norms, biases)
    range_lr: float = 1e-4  # of the learned steps and offsets
    learn_ranges: bool = True
    batch: int = 8  # windows per optimizer step
    micro_batch: int = 2  # windows per forward/backward (the rest accumulates)
    seq_len: int = 512
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise QATError(f"--steps must be at least 1, got {self.steps}")
        if not (0 < self.lr < math.inf and 0 <= self.range_lr < math.inf):
            raise QATError(f"learning rates must be positive and finite, got --lr {self.lr}, "
                           f"range lr {self.range_lr}")
        if self.batch < 1 or self.micro_batch < 1 or self.seq_len < 2:
            raise QATError(f"need a batch of at least 1 window of at least 2 tokens, got {self.batch} x "
                           f"{self.seq_len}")

    def train_config(self) -> TrainConfig:
        micro = math.gcd(self.batch, self.micro_batch)  # divides the batch
        return TrainConfig(steps=self.steps, batch_tokens=self.batch * self.seq_len, micro_batch=micro,
                           seq_len=self.seq_len, grad_clip=self.grad_clip, eval_interval=0,
                           checkpoint_interval=0, keep_checkpoints=1, log_interval=max(1, self.steps // 20))


class TrainedTensors:
    """A QAT checkpoint's model part: the tensors that train (master weights, ranges, norms) in one
    safetensors file; the frozen rest (embedding, head) is what `quantize` made of the source model."""

    def __init__(self, trainable: list[str]) -> None:
        self.trainable = list(trainable)

    def write(self, folder: Path, model_state: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer: Any, step: int) -> None:
        tensors = {n: model_state[n].detach().cpu().contiguous() for n in self.trainable}
        save_file(tensors, str(folder / TRAINED_NAME), metadata={"format": "pt", "step": str(step)})

    def read(self, folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        try:
            tensors, _ = load_tensors(folder / TRAINED_NAME, self.trainable)
        except SafetensorsError as err:
            raise ResumeError(f"cannot resume from {folder}: {err}") from err
        return tensors


def token_windows(tokens: np.ndarray, seq_len: int, seed: int, *, name: str = "qat text") -> TokenWindows:
    """The text's token stream as the trainer's resumable, seeded windows of seq_len + 1 tokens."""
    shard = TokenShard(path=Path(name), tokens=np.asarray(tokens), doc_starts=np.zeros(1, dtype=np.int64))
    if len(shard) < seq_len + 1:
        raise QATError(f"the training text has {len(shard):,} tokens, fewer than one window of {seq_len + 1}")
    return TokenWindows([shard], seq_len, seed)


def trainable_parameters(model: Transformer) -> tuple[list[nn.Parameter], list[nn.Parameter], list[str]]:
    """(weights, ranges, names): everything float in the blocks and the final norm trains; the
    embedding (for tied models a copy of the rounded head) and the head stay."""
    model.requires_grad_(False)
    weights, ranges, names = [], [], []
    for prefix, module in (("blocks.", model.blocks), ("final_norm.", model.final_norm)):
        for name, p in module.named_parameters():
            p.requires_grad_(True)
            (ranges if name.endswith((".step", ".offset")) else weights).append(p)
            names.append(prefix + name)
    return weights, ranges, names


def train_fake_quantized(model: Transformer, tokens: np.ndarray, config: QATConfig, *,
                         run_dir: str | Path | None = None, tokenizer: Any = None,
                         quiet: bool = False) -> dict[str, Any]:
    """Train a model holding `FakeQuantLinear`s with the causal LM objective through the `Trainer`;
    its summary. `run_dir` keeps metrics.jsonl, the plot and the last checkpoint (default: a
    temporary folder, removed after)."""
    config.validate()
    weights, ranges, names = trainable_parameters(model)
    groups = [{"params": weights, "lr": config.lr, "base_lr": config.lr, "name": "weights"}]
    if ranges:
        groups.append({"params": ranges, "lr": config.range_lr, "base_lr": config.range_lr, "name": "ranges"})
    # no weight decay: it would pull the weights toward zero, across the grid's levels
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = ScheduleConfig(kind="cosine", warmup_steps=min(config.warmup_steps, config.steps // 2),
                              min_lr_ratio=0.1)

    def lr_factor(step: int) -> float:
        return lr_at(step, config.steps, 1.0, schedule)

    data = token_windows(tokens, config.seq_len, config.seed)
    with tempfile.TemporaryDirectory(prefix="lmforge-qat-") as scratch:
        trainer = Trainer(model, CausalLMObjective(), optimizer, lr_factor, data, config.train_config(),
                          run_dir or scratch, run_config={"qat": config.__dict__}, tokenizer=tokenizer,
                          quiet=quiet, model_store=TrainedTensors(names))
        if trainer.metrics_path.exists():
            trainer.metrics_path.unlink()  # a fresh run: an old log would mix two runs
        summary = trainer.fit()
        summary["first_loss"] = trainer.history[0]["loss"] if trainer.history else None
    model.eval()
    return summary


@dataclass
class QATReport(QuantizeReport):
    init: str = "rtn"
    steps: int = 0
    train_tokens: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    train_seconds: float = 0.0
    training: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        loss = (f": training loss {self.first_loss:.3f} -> {self.final_loss:.3f}"
                if self.first_loss is not None and self.final_loss is not None else "")
        return (super().describe() + f"\ntrained through the rounding from {self.init}'s grid for "
                f"{self.steps} steps on {self.train_tokens:,} tokens ({self.train_seconds:.0f} s){loss}")


def qat_quantize(model: Transformer, grid: Grid, tokens: np.ndarray, config: QATConfig, *,
                 init: Init = "rtn", calibration: torch.Tensor | None = None,
                 head: Literal["int8", "same", "none"] = "int8", act_order: bool = False, damp: float = 0.01,
                 run_dir: str | Path | None = None, tokenizer: Any = None, quiet: bool = False,
                 progress: Callable[[str], None] | None = None) -> QATReport:
    """Quantize `model` in place by `init`, train it through the rounding on `tokens` (a token stream),
    convert to the engine's layers. `calibration` [samples, tokens] for a gptq or awq start."""
    if init not in INITS:
        raise QATError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    config.validate()
    if config.seq_len > model.config.max_seq_len:
        raise QATError(f"--seq-len {config.seq_len} exceeds the model's context ({model.config.max_seq_len})")
    if len(tokens) < config.seq_len + 1:
        raise QATError(f"the training text has {len(tokens):,} tokens, fewer than one window of "
                       f"{config.seq_len + 1} (--seq-len + 1)")
    masters = {}
    if init == "rtn":  # the float weights keep training; gptq/awq start from their own rounded weights
        masters = {f"blocks.{i}.{n}": layer.weight for i, block in enumerate(model.blocks)
                   for n, layer in linear_layers(block).items()}
    started = time.perf_counter()
    base = quantize_model(model, init, grid, calibration=calibration, head=head, act_order=act_order,
                          damp=damp, progress=progress)
    add_fake_quant(model, grid, masters=masters, learn_ranges=config.learn_ranges)
    del masters
    summary = train_fake_quantized(model, tokens, config, run_dir=run_dir, tokenizer=tokenizer, quiet=quiet)
    layers = to_engine(model)
    report = QATReport("qat", grid.bits, base.group_size, head, layers=layers, bytes_before=base.bytes_before,
                       calibration_tokens=base.calibration_tokens, init=init, steps=summary["steps"],
                       train_tokens=summary["tokens_seen"], first_loss=summary.get("first_loss"),
                       final_loss=summary.get("final_loss"), train_seconds=summary["seconds"])
    report.bytes_after = base.bytes_after
    report.seconds = time.perf_counter() - started
    report.details = {"init": init, "init_details": base.details, "learn_ranges": config.learn_ranges,
                      "lr": config.lr, "range_lr": config.range_lr, "batch": config.batch,
                      "seq_len": config.seq_len, "steps": summary["steps"],
                      "train_tokens": summary["tokens_seen"],
                      "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss")}
    return report
