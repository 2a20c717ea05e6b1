"""`Trainer`: the one training loop. Objectives plug into it; it owns everything else.

One optimizer step is:

1. `accum` micro-batches, each forward + backward under the chosen precision, each loss
   divided by `accum` so the summed gradients are the mean over the whole batch
   (gradient accumulation: a large batch in tokens on a small machine);
2. the gradient norm, clipped to `grad_clip` (one bad batch cannot throw the weights
   far); a NaN/inf loss or gradient stops here, before the weights are touched;
3. the learning rate for this step from the schedule, then the optimizer step.

Precision `bf16` runs matmuls in bfloat16 under autocast while the weights, their
gradients and the optimizer state stay fp32 ("master weights"): bf16 has fp32's range
but only 8 bits of mantissa, too coarse to accumulate many small updates into.

MFU (model FLOPs utilisation) is the model's FLOPs per second over a peak: either a
figure the recipe states (`peak_flops: 9.89e14`, a datasheet number) or, with
`peak_flops: measure`, the rate of one large matmul timed on this device at start-up.
Which one was used is shown ("MFU 31% of measured peak"; `peak_flops_source` in summary.json):
the two differ, since a measured matmul peak is reachable and a datasheet peak rarely is.

At each evaluation point (`eval_interval`) the trainer measures the validation loss and,
when given a `probe`, the benchmark tasks `eval_tasks` names (lmforge.eval.probe builds
it: `lmforge eval`'s tasks on a fixed sample of `eval_task_limit` items, so the points of
the curve are comparable); both are logged and plotted beside the training loss.

Under `torchrun` the same loop runs on every rank; a `Parallel` strategy
(lmforge.train.parallel) decides which rows each rank computes and how gradients,
losses and checkpoints are combined. Only rank 0 prints, logs, plots and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.atomic import atomic_write
from lmforge.train.batch import BatchSource
from lmforge.train.checkpoint import ModelStore, latest_checkpoint
from lmforge.train.objectives import Objective
from lmforge.train.parallel.base import Parallel

# (model, tokenizer) -> {"eval/mmlu/accuracy": 0.31, ...}: benchmark scores of the model as it is now
Probe = Callable[[nn.Module, Any], dict[str, float]]
TASK_PREFIX = "eval/"  # what marks a probe's scores in the metrics log


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient: training stopped before the optimizer step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `fit`: the step in flight finished, a checkpoint was saved (`checkpoint`)."""

    def __init__(self, step: int, steps: int, checkpoint: Path | None) -> None:
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"interrupted after step {step} of {steps}; {saved}")
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


@contextlib.contextmanager
def _stop_at_step_boundary() -> Any:
    """Turns the first Ctrl-C into a request (`requested.is_set()`) that the loop honours between
    optimizer steps, so a checkpoint is never taken of half-updated weights. A second Ctrl-C
    interrupts at once. Outside the main thread (signals cannot be caught there) it does nothing."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_tokens: int = 65536  # tokens per optimizer step: micro_batch * seq_len * accumulation
    micro_batch: int = 8  # sequences per forward/backward
    seq_len: int = 256
    grad_clip: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    eval_interval: int = 100  # 0: never
    eval_batches: int = 10
    eval_tasks: list[str] = field(default_factory=list)  # `lmforge eval` tasks run at each eval point
    eval_task_limit: int = 50  # items per task (the same seeded sample every time)
    checkpoint_interval: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    log_interval: int = 10
    # peak FLOP/s for MFU: a stated figure (e.g. 9.89e14: H100 SXM bf16 dense, datasheet), "measure"
    # (time a large matmul on this device once), or None (no MFU)
    peak_flops: float | Literal["measure"] | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    device: str = "auto"  # auto: cuda when available, else cpu

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def accumulation(self) -> int:
        if self.batch_tokens % self.micro_tokens:
            raise ValueError(f"train.batch_tokens ({self.batch_tokens}) must be a multiple of micro_batch * "
                             f"seq_len ({self.micro_batch} * {self.seq_len} = {self.micro_tokens})")
        return self.batch_tokens // self.micro_tokens


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, *, size: int | None = None,
                         seconds: float = 0.25) -> float:
    """FLOP/s of repeated square matmuls (2 n^3 FLOPs each) on `device`: a measured, reachable peak.

    The best of five short windows, not their mean: on a shared machine a neighbour's
    burst during start-up would otherwise lower the peak and inflate every MFU after it."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: kernel selection, allocation
    sync()
    best = 0.0
    for _ in range(5):
        reps, started = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:
                sync()
                elapsed = time.perf_counter() - started
                if elapsed >= seconds / 5:
                    break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


class Trainer:
    """Trains `model` on `train_data` with `objective`; logs, evaluates and checkpoints into `run_dir`.

    `lr_factor(step)` returns the schedule's multiplier for optimizer step `step`; each
    param group's lr is its `base_lr` times that. `bytes_per_token` (from the shard
    meta) turns validation loss into bits per byte, comparable across tokenizers.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        lr_factor: Callable[[int], float],
        train_data: BatchSource,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        val_data: BatchSource | None = None,
        bytes_per_token: float | None = None,
        run_config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        quiet: bool = False,
        parallel: Parallel | None = None,
        model_store: ModelStore | None = None,
        probe: Probe | None = None,
    ) -> None:
        if config.eval_tasks and probe is None:
            raise ValueError(f"train.eval_tasks {config.eval_tasks} needs a probe to run them: pass "
                             "probe=lmforge.eval.probe.probe_for(config.train) (the CLI does)")
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.probe = probe
        self.lr_factor, self.train_data, self.val_data = lr_factor, train_data, val_data
        self.config, self.run_dir = config, Path(run_dir)
        self.bytes_per_token, self.run_config = bytes_per_token, run_config or {}
        self.tokenizer, self.quiet = tokenizer, quiet
        self.model_store = model_store  # what a checkpoint holds of the model (default: all of it)
        self.device = next(model.parameters()).device
        self.parallel = parallel or Parallel(self.device)
        if probe is not None and self.parallel.world > 1:
            raise ValueError("train.eval_tasks runs in a single process; under torchrun, score the "
                             "checkpoints with `lmforge eval` instead")
        # this rank's share of each step: `accum` forwards of `micro_batch` sequences
        self.micro_batch, self.accum = self.parallel.local_plan(config.micro_batch, config.accumulation())
        self.batches = self.parallel.rank_batches(train_data)
        wrapped = self.parallel.wrap(model)
        self.forward_model: nn.Module = torch.compile(wrapped) if config.compile else wrapped  # type: ignore[assignment]
        self.step = 0
        self.tokens_seen = 0
        self.resumed_state: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.checkpoints = self.run_dir / "checkpoints"
        flops = getattr(getattr(model, "config", None), "flops_per_token", None)
        self.flops_per_token = flops(config.seq_len) if flops else None
        self.peak_flops: float | None = None
        self.peak_flops_source: str | None = None
        if config.peak_flops == "measure":
            dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
            self.peak_flops, self.peak_flops_source = measure_matmul_flops(self.device, dtype), "measured"
        elif config.peak_flops:
            self.peak_flops, self.peak_flops_source = float(config.peak_flops), "stated"

    # ------------------------------------------------------------------ precision
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one step
    def accumulate_gradients(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward/backward over `accum` micro-batches; (mean loss, mean metrics), still on the device.

        Nothing here waits for the device: the one host sync of a step is in `train_step`.
        """
        self.model.train()
        total = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for i in range(self.accum):
            batch = self.batches.next_batch(self.micro_batch).to(self.device, non_blocking=True)
            last = i == self.accum - 1
            loss, metrics = self.parallel.forward_backward(self.objective, self.forward_model, batch,
                                                           self.accum, self.autocast, last)
            total += loss / self.accum
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value.float() / self.accum
        return total, sums

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; the logged record, or None when a non-finite step was skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.accumulate_gradients()
        # this rank's means -> the whole batch's (identical on every rank, so all take the same branch below)
        loss, *metric_means = self.parallel.global_mean(torch.stack([loss.float(), *metrics.values()]))
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = self.parallel.clip_grad_norm(self.model, max_norm)
        # the step's one host sync: every logged number in a single transfer, needed before the optimizer
        # step anyway to keep a non-finite step away from the weights
        loss_value, norm_value, *metric_values = torch.stack(
            [loss, grad_norm.float(), *metric_means]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            message = (f"step {self.step + 1}: the {what} is not finite (loss {loss_value}, grad norm "
                       f"{norm_value}); the weights were not updated")
            if self.config.on_nonfinite == "stop":
                raise NonFiniteError(message + ". Lower the learning rate, enable grad_clip, use "
                                     "precision: fp32, or set train.on_nonfinite: skip")
            self._say(f"warning: {message}; skipping this batch")
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            return None
        factor = self.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += self.config.batch_tokens
        lr = self.optimizer.param_groups[0]["lr"]
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                **dict(zip(metrics, metric_values))}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over fixed batches (with bits per byte when bytes/token is known),
        and the probe's task scores."""
        out = self.probe(self.model, self.tokenizer) if self.probe is not None else {}
        if self.val_data is None:
            return out
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for batch in self.val_data.first_batches(self.config.micro_batch, self.config.eval_batches):
            total += self.parallel.eval_loss(self.objective, self.forward_model, batch.to(self.device),
                                             self.autocast)
            count += 1
        val_loss = float(self.parallel.global_mean(total)) / count
        out["val_loss"] = val_loss
        if self.bytes_per_token:
            out["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint (every rank takes part; rank 0 writes); its folder, None on other ranks."""
        state = {"tokens_seen": self.tokens_seen, "data": self.train_data.state_dict(),
                 "config": self.run_config}
        return self.parallel.save_checkpoint(self.checkpoints, self.step, self.model, self.optimizer, state,
                                             keep=self.config.keep_checkpoints, tokenizer=self.tokenizer,
                                             store=self.model_store)

    def resume(self, folder: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, data position, step and the metrics log."""
        state = self.parallel.load_checkpoint(Path(folder), self.model, self.optimizer, self.model_store)
        self.resumed_state = state  # the checkpoint's state.json, for callers that compare recipes
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.train_data.load_state_dict(state["data"])
        # the log may hold steps past the checkpoint (the run died after it): drop them
        kept: list[dict[str, Any]] = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("step", 0) <= self.step:
                        kept.append(record)
        if self.parallel.is_main:
            with atomic_write(self.metrics_path, "w") as f:  # a crash here must not lose the whole log
                f.write("".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept
        self._say(f"resumed from {folder} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to `config.steps`; returns a summary (also written to run_dir/summary.json).

        Ctrl-C stops after the step in flight, saves a checkpoint and raises
        `TrainingInterrupted`; a rerun resumes there. A run already at `config.steps` does
        nothing and returns the summary it wrote when it finished.
        """
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.step >= cfg.steps and self.history:
            return self._finished_summary()
        start_step, started = self.step, time.perf_counter()
        last_ckpt: Path | None = None
        record: dict[str, Any] | None = None
        eval_record: dict[str, float] = {}
        main = self.parallel.is_main
        with (open(self.metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as log,
              _stop_at_step_boundary() as stop):
            while self.step < cfg.steps:
                if stop.is_set():
                    raise self._interrupted(last_ckpt)
                t0 = time.perf_counter()
                record = self.train_step()
                if record is None:  # a skipped non-finite step: nothing to log
                    if self.step == cfg.steps:
                        last_ckpt = self.save()
                    continue
                elapsed = time.perf_counter() - t0
                record["tokens_per_s"] = cfg.batch_tokens / elapsed if elapsed > 0 else 0.0
                if self.flops_per_token and self.peak_flops:  # the peak is one device's; there are `world`
                    record["mfu"] = (record["tokens_per_s"] * self.flops_per_token
                                     / (self.peak_flops * self.parallel.world))
                at_end = self.step == cfg.steps
                evaluates = self.val_data is not None or self.probe is not None
                evaluated = evaluates and ((cfg.eval_interval and self.step % cfg.eval_interval == 0)
                                           or at_end)
                if evaluated:
                    eval_record = self.evaluate()
                    record.update(eval_record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                self.history.append(record)
                if self.step % max(1, cfg.log_interval) == 0 or at_end or evaluated:
                    self._progress(record, start_step, started)
                if (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or at_end:
                    last_ckpt = self.save()
        seconds = time.perf_counter() - started
        plot = self.plot() if main else None
        steps_run = self.step - start_step
        summary = {
            "steps": self.step, "steps_this_run": steps_run, "tokens_seen": self.tokens_seen,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(steps_run * cfg.batch_tokens / seconds, 1) if seconds > 0 else None,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            **eval_record,
            "peak_flops": self.peak_flops, "peak_flops_source": self.peak_flops_source,
            "checkpoint": str(last_ckpt or latest_checkpoint(self.checkpoints) or ""),
            "metrics": str(self.metrics_path), "plot": str(plot) if plot else None,
        }
        if main:
            with atomic_write(self.run_dir / "summary.json", "w") as f:
                f.write(json.dumps(summary, indent=2) + "\n")
        return summary

    def _interrupted(self, last_checkpoint: Path | None) -> TrainingInterrupted:
        """Save what an interrupted run has learnt (unless the last checkpoint is this step)."""
        if self.parallel.world > 1:  # saving is a collective the other ranks are not taking part in
            return TrainingInterrupted(self.step, self.config.steps, None)
        if self.step and (last_checkpoint is None or last_checkpoint.name != f"step-{self.step:06d}"):
            last_checkpoint = self.save()
        if self.history:
            self.plot()
        return TrainingInterrupted(self.step, self.config.steps, last_checkpoint if self.step else None)

    def _finished_summary(self) -> dict[str, Any]:
        """A rerun of a finished run: nothing to train, and the summary on disk stays as it is."""
        self._say(f"the run is already at step {self.step} of {self.config.steps}: nothing to do "
                  "(raise train.steps to train further)")
        path = self.run_dir / "summary.json"
        if path.exists():
            with contextlib.suppress(ValueError):
                return json.loads(path.read_text(encoding="utf-8")) | {"steps_this_run": 0}
        return {"steps": self.step, "steps_this_run": 0, "tokens_seen": self.tokens_seen,
                "final_loss": self.history[-1]["loss"],
                "checkpoint": str(latest_checkpoint(self.checkpoints) or "")}

    # ------------------------------------------------------------------ reporting
    def _say(self, text: str) -> None:
        if not self.quiet and self.parallel.is_main:
            print(text, file=sys.stderr, flush=True)

    def _progress(self, record: dict[str, Any], start_step: int, started: float) -> None:
        done = self.step - start_step
        rate = (time.perf_counter() - started) / max(1, done)
        eta = _duration(rate * (self.config.steps - self.step))
        parts = [f"step {self.step}/{self.config.steps}", f"loss {record['loss']:.4f}",
                 f"lr {record['lr']:.2e}", f"|g| {record['grad_norm']:.2f}",
                 f"{record['tokens_per_s']:,.0f} tok/s"]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}% of {self.peak_flops_source} peak")
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}")
        if "val_bpb" in record:
            parts.append(f"bpb {record['val_bpb']:.3f}")
        parts += [f"{key.removeprefix(TASK_PREFIX)} {value:.3f}" for key, value in record.items()
                  if key.startswith(TASK_PREFIX)]
        parts.append(f"ETA {eta}")
        self._say(" | ".join(parts))

    def plot(self) -> Path | None:
        """metrics.png: training (and validation) loss, the probe's task scores, and the learning rate,
        against the step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self._say("note: matplotlib is not installed; no plot written (pip install matplotlib)")
            return None
        if not self.history:
            return None
        steps = [r["step"] for r in self.history]
        tasks = sorted({key for r in self.history for key in r if key.startswith(TASK_PREFIX)})
        if tasks:
            fig, (ax_loss, ax_task, ax_lr) = plt.subplots(3, 1, figsize=(8, 8), sharex=True,
                                                          height_ratios=[3, 2, 1])
            for key in tasks:
                ax_task.plot(*zip(*[(r["step"], r[key]) for r in self.history if key in r]), "o-",
                             label=key.removeprefix(TASK_PREFIX))
            ax_task.set_ylabel("task score")
            ax_task.legend()
            ax_task.grid(alpha=0.3)
        else:
            fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
        ax_loss.plot(steps, [r["loss"] for r in self.history], label="train", linewidth=1)
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        if val:
            ax_loss.plot(*zip(*val), "o-", label="validation")
        ax_loss.set_ylabel("loss (nats/token)")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_lr.plot(steps, [r["lr"] for r in self.history], color="tab:green")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "metrics.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
