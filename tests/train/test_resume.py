"""Checkpoints and exact resume: a run killed with SIGKILL continues bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ConfigKeyError
from lmforge.data.errors import DataInputError
from lmforge.data.shards import load_shard_set
from lmforge.model.transformer import Transformer
from lmforge.train.checkpoint import (
    ResumeError,
    flatten_optimizer_state,
    latest_checkpoint,
    unflatten_optimizer_state,
)
from lmforge.train.data import TokenWindows
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.pretrain import model_config, pretrain

from .tiny_run import tiny_args, tiny_config

RUN = ["train.steps=60", "train.checkpoint_interval=10", "train.eval_interval=20", "train.eval_batches=2",
       "deterministic=true", "train.keep_checkpoints=2"]


def _pretrain_process(shards: Path, output: Path) -> subprocess.Popen:
    args = [a for item in tiny_args(shards, output, *RUN) for a in ("--set", item)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", "pretrain", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _curve(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("val_loss")) for r in records]


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_identical(shards, tmp_path):
    straight = _pretrain_process(shards, tmp_path / "straight")
    _, err = straight.communicate(timeout=120)
    assert straight.returncode == 0, err

    victim_out = tmp_path / "victim"
    victim = _pretrain_process(shards, victim_out)
    log = victim_out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 25:
            break
        time.sleep(0.002)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = len(_records(victim_out))
    checkpoint = latest_checkpoint(victim_out / "checkpoints")
    assert checkpoint is not None and killed_at >= 25

    resumed = _pretrain_process(shards, victim_out)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resumed from {checkpoint} at step {int(checkpoint.name.split('-')[1])}" in err
    assert _curve(_records(victim_out)) == _curve(_records(tmp_path / "straight"))
    assert len(_records(victim_out)) == 60
    assert len(list((victim_out / "checkpoints").iterdir())) == 2  # keep_checkpoints


def test_resume_from_another_architecture_is_a_clear_error(shards, tmp_path):
    pretrain(tiny_config(shards, tmp_path / "run", "train.steps=2", "train.eval_interval=0"), quiet=True)
    wider = tiny_config(shards, tmp_path / "run", "train.steps=4", "model.d_model=96", "model.d_ff=256")
    with pytest.raises(ResumeError, match=r"another architecture \(d_ff: checkpoint 172, config 256; "
                                          r"d_model: checkpoint 64, config 96\)"):
        pretrain(wider, quiet=True)


def test_optimizer_state_round_trips_through_flattening():
    torch.manual_seed(0)
    model = Transformer(model_config({"preset": "llama-tiny", "vocab_size": 64, "d_model": 32, "n_layers": 1,
                                      "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}))
    for name in ("adamw", "muon", "lamb", "sgd"):
        optimizer = build_optimizer(model, OptimConfig(name=name))
        model(torch.randint(0, 64, (1, 8))).logits.sum().backward()
        optimizer.step()
        original = optimizer.state_dict()
        tensors, meta = flatten_optimizer_state(original)
        restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
        assert restored["state"].keys() == original["state"].keys()
        for index, entries in original["state"].items():
            for key, value in entries.items():
                got = restored["state"][index][key]
                assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
        optimizer.load_state_dict(restored)  # torch accepts it back


def test_data_order_is_seeded_and_resumable(shards):
    _, train = load_shard_set(shards, "train")
    a = TokenWindows(train, 32, seed=5)
    first = [a.next_batch(4) for _ in range(3)]
    position = a.state_dict()
    following = a.next_batch(4)
    b = TokenWindows(train, 32, seed=5)
    assert all(torch.equal(x.input_ids, b.next_batch(4).input_ids) for x in first)
    c = TokenWindows(train, 32, seed=5)
    c.load_state_dict(position)
    assert torch.equal(c.next_batch(4).input_ids, following.input_ids)
    assert not torch.equal(TokenWindows(train, 32, seed=6).next_batch(4).input_ids, first[0].input_ids)
    with pytest.raises(ValueError, match="seq_len, bos_align or seed changed"):
        TokenWindows(train, 16, seed=5).load_state_dict(position)


def test_bos_aligned_windows_start_at_documents(shards, tiny_tokenizer):
    _, train = load_shard_set(shards, "train")
    windows = TokenWindows(train, 32, seed=0, bos_align=True)
    starts = set(np.asarray(train[0].doc_starts).tolist())
    assert set(windows.starts.tolist()) <= starts
    batch = windows.next_batch(8)
    assert batch.input_ids.shape == batch.labels.shape == (8, 32)
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])  # labels are the inputs shifted by one
    previous = [int(train[0].tokens[s - 1]) for s in windows.starts[:20] if s > 0]
    assert set(previous) == {tiny_tokenizer.eos_token_id}  # each window follows a document's end


def test_config_errors_name_the_key(shards, tmp_path):
    with pytest.raises(ConfigKeyError, match="'train.stepz'"):
        tiny_config(shards, tmp_path, "train.stepz=3")
    with pytest.raises(ConfigKeyError, match="train.steps must be int"):
        tiny_config(shards, tmp_path, "train.steps=many")
    with pytest.raises(ConfigKeyError, match="'optim.name'|optim.name must be one of"):
        tiny_config(shards, tmp_path, "optim.name=adam")
    with pytest.raises(ConfigKeyError, match="'model.d_modle'"):
        pretrain(tiny_config(shards, tmp_path, "model.d_modle=3"), quiet=True)
    with pytest.raises(DataInputError, match="no finished token shards"):
        pretrain(tiny_config(tmp_path / "nowhere", tmp_path / "out"), quiet=True)
