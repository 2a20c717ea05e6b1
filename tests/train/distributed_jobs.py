"""Run several `lmforge pretrain` jobs, one after another, inside one torchrun launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/distributed_jobs.py JOBS.json

JOBS.json is a list of argument lists, each what follows `lmforge pretrain`. Starting
processes and importing torch costs far more than training the tiny test models, so
test_distributed.py pays it once for all its jobs. The process group is begun here and
shared by the jobs (`pretrain` leaves a group it did not begin); each job goes through
the CLI's own entry point, `lmforge.cli.main`, exactly as `torchrun -m lmforge.cli` would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.cli import main


def run_jobs(jobs_file: Path) -> int:
    torch.set_num_threads(1)  # two processes on a small machine: one thread each
    dist.init_process_group("gloo")
    try:
        for args in json.loads(jobs_file.read_text(encoding="utf-8")):
            code = main(["pretrain", *args])
            if code:
                return code
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_jobs(Path(sys.argv[1])))
