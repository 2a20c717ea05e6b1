"""Alignment: preference data, reward models, DPO and its family, PPO and GRPO with rollouts
on lmforge's own `Engine`, all through the one `Trainer` (only the `Objective` and the
batches differ from pretraining and SFT)."""
