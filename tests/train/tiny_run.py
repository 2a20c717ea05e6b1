"""A tiny llama-style run configuration shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import load_config
from lmforge.train.pretrain import PretrainConfig

TINY_OVERRIDES = [
    "model.preset=llama-tiny", "model.vocab_size=384", "model.d_model=64", "model.n_layers=2",
    "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=172", "model.max_seq_len=128",
    "train.seq_len=64", "train.micro_batch=8", "train.batch_tokens=1024", "train.log_interval=10",
    "optim.lr=3e-3", "schedule.warmup_steps=5", "train.device=cpu",
]


def tiny_args(shards: Path, output: Path, *extra: str) -> list[str]:
    return [f"data.folder={shards}", f"output={output}", *TINY_OVERRIDES, *extra]


def tiny_config(shards: Path, output: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, tiny_args(shards, output, *extra))
