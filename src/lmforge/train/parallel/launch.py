"""Start-up under `torchrun`: join the process group and pick the strategy the config names.

`torchrun --nproc_per_node N -m lmforge pretrain ...` starts N copies of the same
program; each learns its rank (0..N-1) and the world size N from environment variables
and joins one process group (gloo on CPU, NCCL on CUDA) to exchange tensors.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lmforge.train.parallel.base import Parallel, ParallelConfig, ParallelError
from lmforge.train.parallel.data import DDPParallel, FSDPParallel


def launched_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) when started directly."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def init_parallel(config: ParallelConfig, device: torch.device) -> Parallel:
    """Join torchrun's process group and return the strategy the config names, checked against the world."""
    rank, local_rank, world = launched_world()
    if config.tensor < 1 or config.pipeline < 1:
        raise ParallelError("parallel.tensor and parallel.pipeline must be at least 1")
    if config.microbatches < 0:
        raise ParallelError("parallel.microbatches must be 0 (one per train.micro_batch) or positive")
    wanted = [what for what, on in (("parallel.strategy", config.strategy != "none"),
                                    ("parallel.tensor", config.tensor > 1),
                                    ("parallel.pipeline", config.pipeline > 1)) if on]
    if len(wanted) > 1:
        raise ParallelError(f"{' and '.join(wanted)} are set together; lmforge runs one kind of parallelism "
                            "at a time (data, tensor or pipeline)")
    degree = config.tensor if config.tensor > 1 else config.pipeline
    if world == 1:
        if degree > 1:
            raise ParallelError(f"{wanted[0]}: {degree} needs {degree} processes; launch with "
                                f"torchrun --nproc_per_node {degree} -m lmforge.cli pretrain ...")
        return Parallel(device)  # ddp/fsdp over one process is plain training
    if degree > 1 and degree != world:
        raise ParallelError(f"{wanted[0]} is {degree} but torchrun started {world} processes: set them equal")
    if not wanted:
        raise ParallelError(f"torchrun started {world} processes but the config trains in one: set "
                            "parallel.strategy (ddp or fsdp), parallel.tensor or parallel.pipeline")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()  # a caller's group (several runs in one launch) is left to it
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    parallel: Parallel
    if config.strategy == "ddp":
        parallel = DDPParallel(device, rank, world)
    elif config.strategy == "fsdp":
        parallel = FSDPParallel(device, rank, world)
    elif config.tensor > 1:
        from lmforge.train.parallel.tensor import TensorParallel

        parallel = TensorParallel(device, rank, world)
    else:
        from lmforge.train.parallel.pipeline import PipelineParallel

        parallel = PipelineParallel(device, rank, world, schedule=config.schedule,
                                    microbatches=config.microbatches)
    parallel.owns_group = owns_group
    return parallel
