"""Training on several processes started by `torchrun`: one `Parallel` strategy per layout.

The trainer talks to a `Parallel` object at each point where the strategies differ:
which rows of the batch this rank computes, how a forward/backward runs, how a loss
becomes the global mean, how the gradient norm is measured, how a checkpoint is
gathered and scattered. The base class (parallel/base.py) is the single process; the
strategies are

- `DDPParallel` (data parallel): every rank holds the whole model and computes its share
  of the batch; the gradients are averaged by an all-reduce during the last backward.
- `FSDPParallel` (fully sharded data parallel, `fully_shard`): the same arithmetic, but
  each rank stores only 1/N of every weight, gradient and optimizer moment; a layer's
  full weights are all-gathered just before it runs and freed after.
  (parallel/data.py)
- `TensorParallel` (parallel/tensor.py): every matrix of a block split across ranks.
- `PipelineParallel` (parallel/pipeline.py): the layer stack split into stages.

parallel/launch.py joins torchrun's process group and builds the strategy the config
names; parallel/sharding.py holds what the sharded strategies share.

Whatever the strategy, a checkpoint has the single-process layout (a full state dict in
the HF folder, the optimizer state keyed by parameter index), so it resumes in one
process or at any world size.
"""
