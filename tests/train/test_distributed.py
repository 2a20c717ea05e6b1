"""Data, tensor and pipeline parallelism: two real CPU processes over gloo, against one process.

Every two-process job runs inside one torchrun launch (distributed_jobs.py): starting two
processes and importing torch costs far more than six steps of a tiny model. The jobs
train the same recipe as the single-process reference, with the same global batch; only
the `parallel:` section differs.

Tolerance. With the same data, the same seed and fp32, the runs differ only in the order
of floating-point sums: two half-batch means averaged instead of one mean, a matmul split
by rows or columns and its pieces added across ranks, a gradient norm summed from
shards. Each such reordering changes the last bits (~1e-7 relative); six AdamW steps
carry that along without blowing it up (measured: losses agree to <= 5e-7, weights to
<= 4e-6). LOSS_RTOL = 1e-5 and WEIGHT_ATOL = 1e-4 leave over an order of magnitude of
margin, while a real bug (a rank on the wrong rows, gradients summed instead of averaged,
a missing shard in the norm or the checkpoint) moves the first step's loss or gradient
norm by far more than 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.model.checkpoint import load_checkpoint
from lmforge.model.transformer import Transformer
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallel.base import ParallelConfig, ParallelError
from lmforge.train.parallel.data import DataParallel, RankShare
from lmforge.train.parallel.launch import init_parallel
from lmforge.train.parallel.pipeline import PipelineParallel, stage_layers
from lmforge.train.parallel.sharding import by_index, by_name, optimizer_param_names
from lmforge.train.parallel.tensor import check_splittable
from lmforge.train.pretrain import model_config, pretrain

from .tiny_run import tiny_args, tiny_config

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
RUN = ["train.steps=4", "train.checkpoint_interval=2", "train.eval_interval=2", "train.eval_batches=2"]
# GPT-2's shape: learned positions, LayerNorm with biases, GELU, biased projections, an untied head
GPT2 = ["model.preset=gpt2", "model.n_kv_heads=4", "model.d_ff=256", "model.tie_embeddings=false"]
JOBS = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "tp": ["parallel.tensor=2"],
    "pp": ["parallel.pipeline=2"],  # 1F1B, 2 micro-batches per step
    "gpt2-tp": [*GPT2, "parallel.tensor=2"],
    "gpt2-pp": [*GPT2, "parallel.pipeline=2", "parallel.schedule=gpipe", "parallel.microbatches=4"],
}
# each continues another layout's step-2 checkpoint: 1 process -> FSDP -> tensor -> pipeline parallel
RESUMED = {
    "fsdp-resumed": ("single", ["parallel.strategy=fsdp"]),
    "tp-resumed": ("fsdp", ["parallel.tensor=2"]),
    "pp-resumed": ("tp", ["parallel.pipeline=2"]),
}
HERE = Path(__file__).parent


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _assert_same_curve(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["lr"] == w["lr"]
        for key in ("loss", "grad_norm", "val_loss"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=LOSS_RTOL), (g["step"], key)


def _assert_same_weights(folder: Path, reference: Path) -> None:
    got, want = load_file(str(folder / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def _final(output: Path) -> Path:
    return output / "checkpoints" / "step-000004"


def _middle(output: Path) -> Path:
    return output / "checkpoints" / "step-000002"


@pytest.fixture(scope="module")
def runs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process references, then every two-process job in one torchrun launch."""
    root = tmp_path_factory.mktemp("parallel")
    pretrain(tiny_config(shards, root / "single", *RUN), quiet=True)
    pretrain(tiny_config(shards, root / "gpt2-single", *RUN, *GPT2), quiet=True)
    # the jobs run in this order, so a resumed job finds the checkpoint an earlier one wrote
    resumed = {name: [*extra, f"resume={_middle(root / source)}"]
               for name, (source, extra) in RESUMED.items()}
    jobs = [["--quiet", *(arg for item in tiny_args(shards, root / name, *RUN, *extra)
                          for arg in ("--set", item))]
            for name, extra in (JOBS | resumed).items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, str(HERE / "distributed_jobs.py"), str(root / "jobs.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("job", ["ddp", "fsdp"])
def test_data_parallel_matches_one_process(runs, job):
    _assert_same_curve(_records(runs / job), _records(runs / "single"))
    _assert_same_weights(_final(runs / job), _final(runs / "single"))
    # the optimizer state comes back in the single-process layout: same names, same numbers
    got = load_file(str(_final(runs / job) / "trainer_state/optimizer.safetensors"))
    want = load_file(str(_final(runs / "single") / "trainer_state/optimizer.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["", "gpt2-"])
def test_tensor_parallel_matches_one_process(runs, family):
    single = runs / f"{family}single"
    _assert_same_curve(_records(runs / f"{family}tp"), _records(single))
    _assert_same_weights(_final(runs / f"{family}tp"), _final(single))
    # the gathered checkpoint computes the same logits as the one-process model
    got, _ = load_checkpoint(_final(runs / f"{family}tp"))
    want, _ = load_checkpoint(_final(single))
    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(tokens).logits, want(tokens).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["", "gpt2-"])
def test_pipeline_parallel_matches_one_process(runs, family):
    single = runs / f"{family}single"
    _assert_same_curve(_records(runs / f"{family}pp"), _records(single))
    _assert_same_weights(_final(runs / f"{family}pp"), _final(single))


@pytest.mark.slow
@pytest.mark.parametrize("job", list(RESUMED))
def test_a_checkpoint_resumes_in_another_layout(runs, job):
    _assert_same_curve(_records(runs / job), _records(runs / "single")[2:])
    _assert_same_weights(_final(runs / job), _final(runs / "single"))


@pytest.mark.slow
def test_ddp_writes_one_checkpoint_that_one_process_resumes(runs, shards, tmp_path):
    folders = sorted(p.name for p in (runs / "ddp/checkpoints").iterdir())
    assert folders == ["step-000002", "step-000004"]  # rank 0 alone wrote; no staging folders left
    model, _ = load_checkpoint(_final(runs / "ddp"))
    reference, _ = load_checkpoint(_final(runs / "single"))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=WEIGHT_ATOL)
    # and a single process continues the two-process run where it stopped, as if it had never split
    resumed = tmp_path / "resumed"
    pretrain(tiny_config(shards, resumed, *RUN, f"resume={_middle(runs / 'ddp')}"), quiet=True)
    assert [r["step"] for r in _records(resumed)] == [3, 4]
    _assert_same_curve(_records(resumed), _records(runs / "single")[2:])


# ---------------------------------------------------------------------------------- no processes needed
def test_rank_shares_tile_the_global_batch(shards):
    from lmforge.data.shards import load_shard_set
    from lmforge.train.data import TokenWindows

    _, train = load_shard_set(shards, "train")
    whole = TokenWindows(train, 64, 7).next_batch(8)
    parts = [RankShare(TokenWindows(train, 64, 7), rank, 2).next_batch(4) for rank in range(2)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), whole.input_ids)
    assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)


def test_local_plan_splits_the_batch_not_the_step():
    dp = DataParallel(torch.device("cpu"), 0, 2)
    assert dp.local_plan(8, 2) == (8, 1)  # 16 sequences: 8 per rank in one forward
    assert dp.local_plan(16, 1) == (8, 1)  # a micro-batch larger than a rank's share shrinks
    assert dp.local_plan(4, 6) == (4, 3)
    with pytest.raises(ParallelError, match="do not split evenly"):
        DataParallel(torch.device("cpu"), 0, 4).local_plan(3, 2)
    pp = PipelineParallel(torch.device("cpu"), 0, 2)
    assert pp.local_plan(8, 2) == (16, 1) and pp.chunks == 2
    with pytest.raises(ParallelError, match="1F1B schedule needs at least"):
        PipelineParallel(torch.device("cpu"), 0, 4).local_plan(8, 2)


def test_stage_layers_cover_the_stack_in_order():
    assert [list(stage_layers(5, s, 2)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(stage_layers(30, s, 4)) for s in range(4)] == [8, 8, 7, 7]


def test_optimizer_state_by_name_round_trips():
    model = Transformer(model_config({"preset": "llama-tiny", "vocab_size": 64, "d_model": 32, "n_layers": 2,
                                      "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}))
    optimizer = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 64, (2, 8))).logits.square().mean().backward()
    optimizer.step()
    indexed = optimizer.state_dict()
    named = by_name(indexed, optimizer_param_names(model, optimizer))
    assert "blocks.1.mlp.down_proj.weight" in named["state"]
    back = by_index(named)
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in indexed["param_groups"]]
    for index, entries in indexed["state"].items():
        assert torch.equal(back["state"][index]["exp_avg"], entries["exp_avg"])


def test_layouts_that_cannot_run_are_named(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ParallelError, match="needs 2 processes; launch with torchrun"):
        init_parallel(ParallelConfig(tensor=2), cpu)
    with pytest.raises(ParallelError, match="one kind of parallelism"):
        init_parallel(ParallelConfig(strategy="fsdp", pipeline=2), cpu)
    assert init_parallel(ParallelConfig(strategy="ddp"), cpu).world == 1  # no torchrun: plain training
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ParallelError, match="torchrun started 2 processes but the config trains in one"):
        init_parallel(ParallelConfig(), cpu)
    with pytest.raises(ParallelError, match="parallel.tensor is 4 but torchrun started 2"):
        init_parallel(ParallelConfig(tensor=4), cpu)
    config = model_config({"preset": "llama-tiny", "d_model": 192, "n_heads": 6, "n_kv_heads": 3})
    with pytest.raises(ParallelError, match=r"n_kv_heads \(3\) is not a multiple of parallel.tensor \(2\)"):
        check_splittable(config, 2)
