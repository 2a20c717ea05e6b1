"""The same code on a CUDA GPU: bf16 autocast, SDPA's flash kernels, torch.compile.

These run only where torch sees a GPU (the CPU suite cannot exercise CUDA); on a CPU-only
machine they are skipped with that reason. They check what differs on a GPU: that a bf16
and a compiled run train as well as fp32 eager, that checkpoints written on the GPU load
on the CPU, and that the inference engine's greedy tokens match the CPU's.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model.checkpoint import load_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.pretrain import pretrain

from .tiny_run import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = ["train.device=cuda", "train.steps=60", "train.eval_interval=20", "train.eval_batches=2",
        "train.checkpoint_interval=0", "deterministic=false"]


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision, compile", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_training_on_the_gpu_learns_like_fp32_eager(shards, tmp_path, precision, compile):
    run = tmp_path / f"{precision}-{compile}"
    summary = pretrain(tiny_config(shards, run, *CUDA, f"train.precision={precision}",
                                   f"train.compile={str(compile).lower()}"), quiet=True)
    losses = _losses(run)
    assert losses[-1] < losses[0] - 1.0, losses  # it learns
    # a GPU checkpoint is an ordinary one: it loads on the CPU and gives finite logits
    model, _ = load_checkpoint(summary["checkpoint"], device="cpu")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    # all three settings land within a small distance of each other
    assert abs(summary["val_loss"] - _reference_val_loss(shards, tmp_path)) < 0.15


_REFERENCE: dict[str, float] = {}


def _reference_val_loss(shards, tmp_path) -> float:
    if "val" not in _REFERENCE:
        summary = pretrain(tiny_config(shards, tmp_path / "reference", *CUDA), quiet=True)
        _REFERENCE["val"] = summary["val_loss"]
    return _REFERENCE["val"]


def test_bf16_logits_on_the_gpu_match_fp32_on_the_cpu():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688,
                         max_seq_len=256, position="rope", norm="rmsnorm", mlp="swiglu")
    model = Transformer(config).eval()
    ids = torch.randint(0, 512, (2, 200))
    with torch.no_grad():
        expected = model(ids).logits.float()
        got = model.to("cuda", torch.bfloat16)(ids.cuda()).logits.float().cpu()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
    assert torch.allclose(got, expected, atol=0.1, rtol=0.05)


def test_greedy_engine_tokens_on_the_gpu_match_the_cpu():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                         max_seq_len=512, position="rope", norm="rmsnorm", mlp="swiglu")
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # far from uniform, so greedy choices are clear-cut
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)  # past the first cache growth
    cpu = [c.token_ids for c in Engine(model, max_batch_size=3).complete(prompts, params)]
    gpu_model = Transformer(config).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu = [c.token_ids for c in Engine(gpu_model.cuda(), max_batch_size=3).complete(prompts, params)]
    assert gpu == cpu
    bf16 = Engine(gpu_model.to(torch.bfloat16), max_batch_size=3).complete(prompts, params)
    assert all(len(c.token_ids) == 300 for c in bf16)
