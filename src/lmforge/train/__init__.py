"""Training: the one loop (`Trainer`), its objectives, optimizers, schedules, data and checkpoints."""

from lmforge.train.objectives import CausalLMObjective, Objective
from lmforge.train.trainer import NonFiniteError, TrainConfig, Trainer

__all__ = ["CausalLMObjective", "NonFiniteError", "Objective", "TrainConfig", "Trainer"]
