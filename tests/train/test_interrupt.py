"""Ctrl-C and reruns: pretraining stops at a step boundary, saves, says how to resume; a rerun with
nothing to do changes nothing; a longer rerun says what happens to its schedule."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from .tiny_run import tiny_args


def _pretrain(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "lmforge", "pretrain", *(f"--{a}" for a in args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def test_ctrl_c_saves_and_a_rerun_resumes(shards, tmp_path):
    run = tmp_path / "run"
    # warm-up of 1 step: wherever Ctrl-C lands (after >= 3 logged steps) the cosine has begun, so a
    # longer rerun really re-stretches it (inside the warm-up both lengths give the same rate)
    args = tiny_args(shards, run, "train.checkpoint_interval=1000", "train.eval_interval=0",
                     "train.log_interval=1", "schedule.warmup_steps=1")
    proc = _pretrain([*args, "train.steps=400"])
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    match = re.search(r"interrupted after step (\d+) of 400; saved ([^;\s]+)", err)
    assert match, err
    step = int(match.group(1))
    assert match.group(2).endswith(f"step-{step:06d}") and (run / "checkpoints" / f"step-{step:06d}").is_dir()
    assert "rerun the same command to resume" in err and "Traceback" not in err

    longer = _pretrain([*args, f"train.steps={step + 2}"])
    _, err = longer.communicate(timeout=300)
    assert longer.returncode == 0, err
    assert f"at step {step}" in err  # resumed, not restarted
    assert "planned for 400 steps and now trains to" in err and "re-stretched" in err
    summary = (run / "summary.json").read_bytes()
    assert json.loads(summary)["steps"] == step + 2

    again = _pretrain([*args, f"train.steps={step + 2}"])
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "nothing to do" in err
    assert (run / "summary.json").read_bytes() == summary  # not overwritten with an empty run's zeros
