"""The loop: learning, accumulation, non-finite steps, metrics, plot and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.data.shards import load_shard_set
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.batch import Batch
from lmforge.train.data import TokenWindows
from lmforge.train.objectives import CausalLMObjective
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.pretrain import model_config, pretrain
from lmforge.train.trainer import NonFiniteError, TrainConfig, Trainer, measure_matmul_flops

from .tiny_run import TINY_OVERRIDES, tiny_config


def test_loss_decreases_and_logs(shards, tmp_path):
    summary = pretrain(tiny_config(shards, tmp_path / "run", "train.steps=40", "train.eval_interval=20",
                                   "train.peak_flops=measure"), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first == pytest.approx(math.log(384), abs=0.3)  # a fresh model is close to uniform
    assert last < first - 0.6
    assert 0 < summary["val_bpb"] < summary["val_loss"] / math.log(2)  # more than one byte per token
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    assert (tmp_path / "run" / "checkpoints" / "step-000040" / "trainer_state" / "state.json").exists()
    assert summary["peak_flops_source"] == "measured" and summary["peak_flops"] > 0
    assert all(r["mfu"] > 0 for r in records)


def test_matmul_peak_is_measured():
    flops = measure_matmul_flops(torch.device("cpu"), size=128, seconds=0.02)
    assert 1e6 < flops < 1e15  # a real rate: a few MFLOP/s at worst, not a datasheet constant


def _tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    values = {k.split("=")[0].removeprefix("model."): k.split("=")[1]
              for k in TINY_OVERRIDES if k.startswith("model.")}
    typed = {k: (v if k == "preset" else int(v)) for k, v in values.items()}
    return Transformer(model_config(typed))


def _trainer(shards, tmp_path, model: Transformer, **train: object) -> Trainer:
    _, train_shards = load_shard_set(shards, "train")
    cfg = TrainConfig(seq_len=32, **train)  # type: ignore[arg-type]
    data = TokenWindows(train_shards, cfg.seq_len, seed=3)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    return Trainer(model, CausalLMObjective(), optimizer, lambda step: 1.0, data, cfg, tmp_path, quiet=True)


def test_accumulation_equals_one_big_batch(shards, tmp_path):
    grads = []
    for micro in (2, 8):  # 4 micro-batches of 2 sequences, or one of 8: the same 8 windows
        model = _tiny_model()
        trainer = _trainer(shards, tmp_path, model, micro_batch=micro, batch_tokens=8 * 32)
        assert trainer.accum == 8 // micro
        loss, _ = trainer.accumulate_gradients()
        grads.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batch_tokens_must_divide(shards, tmp_path):
    with pytest.raises(ValueError, match="batch_tokens"):
        _trainer(shards, tmp_path, _tiny_model(), micro_batch=3, batch_tokens=1000)


class _NaNObjective(CausalLMObjective):
    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        return loss * float("nan"), metrics


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_never_reaches_the_weights(shards, tmp_path, mode):
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(shards, tmp_path, model, micro_batch=2, batch_tokens=64, steps=2, on_nonfinite=mode,
                       eval_interval=0, checkpoint_interval=0)
    trainer.objective = _NaNObjective()
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="step 1: the loss is not finite.*not updated"):
            trainer.train_step()
    else:
        assert trainer.train_step() is None and trainer.step == 1
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_bf16_autocast_keeps_fp32_master_weights(shards, tmp_path):
    model = _tiny_model()
    trainer = _trainer(shards, tmp_path, model, micro_batch=2, batch_tokens=64, precision="bf16")
    record = trainer.train_step()
    assert record is not None and math.isfinite(record["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s.dtype == torch.float32 for st in trainer.optimizer.state.values() for s in st.values()
               if isinstance(s, torch.Tensor) and s.dim() > 0)


def test_moe_aux_loss_is_added(shards):
    config = ModelConfig(vocab_size=384, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64,
                         n_experts=4, n_experts_per_token=2)
    model = Transformer(config)
    batch = Batch.from_windows(torch.randint(0, 384, (2, 17)))
    loss, metrics = CausalLMObjective().loss(model, batch)
    assert "aux" in metrics and float(metrics["aux"]) > 0
    assert float(loss.detach()) == pytest.approx(float(metrics["ce"] + metrics["aux"]), rel=1e-6)


def test_cli_pretrain_with_dotted_overrides(shards, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  folder: {shards}\noutput: {tmp_path / 'cli-run'}\ntrain:\n  steps: 3\n")
    args = ["pretrain", "--config", str(recipe), "-q", *[f"--{o}" for o in TINY_OVERRIDES],
            "--train.eval_interval", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "checkpoint:" in out
    assert main(["pretrain", "--config", str(recipe), "--train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_benchmark_tasks_run_at_each_eval_point_and_match_lmforge_eval(shards, tmp_path):
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.probe import probe_for
    from lmforge.eval.tasks import make_task

    config = tiny_config(shards, tmp_path / "run", "train.steps=40", "train.eval_interval=20",
                         "train.eval_tasks=[perplexity]", "train.eval_task_limit=2")
    pretrain(config, quiet=True, probe=probe_for(config.train, seed=5))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [(r["step"], r["eval/perplexity/perplexity"]) for r in records
              if "eval/perplexity/bits_per_byte" in r]
    assert [step for step, _ in scored] == [20, 40]
    assert scored[1][1] < scored[0][1]  # training on English text lowers perplexity on held-out English
    # the probe's number is what `lmforge eval` says of the checkpoint written at the same step
    model = EvalModel.load(tmp_path / "run" / "checkpoints" / "step-000040")
    again = make_task("perplexity").run(model, limit=2, seed=5).metrics["perplexity"]
    assert scored[1][1] == pytest.approx(again, rel=1e-5)
    # the plot grows a panel for the task scores between the loss and the learning rate
    from PIL import Image

    assert Image.open(tmp_path / "run" / "metrics.png").size == (800, 800)


def test_eval_tasks_without_a_probe_or_with_an_unknown_task_are_refused(shards, tmp_path):
    from lmforge.eval.probe import probe_for

    config = tiny_config(shards, tmp_path / "run", "train.steps=2", "train.eval_tasks=[perplexity]")
    with pytest.raises(ValueError, match="needs a probe"):
        pretrain(config, quiet=True)
    with pytest.raises(ValueError, match="unknown task.*nosuch"):
        probe_for(tiny_config(shards, tmp_path / "r2", "train.eval_tasks=[nosuch]").train)
