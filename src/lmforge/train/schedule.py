"""Learning-rate schedules: a pure function of the step, so resuming needs only the step.

* ``cosine``: linear warmup from 0 to the peak, then a half cosine down to
  ``min_lr_ratio * peak`` at the last step (the GPT-3 / Llama recipe).
* ``wsd`` (warmup-stable-decay): warmup, a long flat stretch at the peak, and a short
  linear decay over the final ``decay_fraction`` of training. Because the flat stretch
  does not depend on the total length, a run can be extended, or branched into several
  decays, without restarting (MiniCPM, DeepSeek).
* ``constant``: warmup, then the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of the peak
    decay_fraction: float = 0.2  # wsd only: the share of the steps spent decaying

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")


def lr_at(step: int, total_steps: int, peak_lr: float, config: ScheduleConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warmup = min(config.warmup_steps, total_steps)
    floor = config.min_lr_ratio * peak_lr
    if step < warmup:
        return peak_lr * (step + 1) / warmup  # never exactly 0: the first step still learns
    if config.kind == "constant":
        return peak_lr
    if config.kind == "cosine":
        span = max(1, total_steps - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.kind == "wsd":
        decay_steps = max(1, round(config.decay_fraction * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - 1 - decay_start))
        return peak_lr + (floor - peak_lr) * progress
    raise ValueError(f"unknown schedule kind {config.kind!r} (cosine, wsd or constant)")
