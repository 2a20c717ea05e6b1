"""Scaling laws: the Chinchilla planner, the L(N, D) fit, the sweep and `lmforge scaling`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lmforge.train.pretrain import model_config
from lmforge.train.scaling import (
    CHINCHILLA,
    LossLaw,
    ScalingError,
    fit_loss_law,
    parse_sizes,
    parse_tokens,
    plan,
    read_results,
    sized_model,
)
from lmforge.train.scaling_cli import register

SWEEP_CONFIG = Path(__file__).parents[2] / "configs" / "scaling" / "pydocs-sweep.yaml"


def lmforge(*argv: str) -> int:
    """`lmforge scaling ...` through the same parser the CLI registers."""
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["scaling", *argv])
    return args.func(args)


# ------------------------------------------------------------------------------ the law and the plan
def test_the_optimum_is_the_least_loss_on_the_iso_flop_line():
    for compute in (1e18, 1e21, 5.76e23):
        n, d = CHINCHILLA.optimal(compute)
        assert 6 * n * d == pytest.approx(compute)
        grid = np.geomspace(n / 30, n * 30, 20001)
        brute = grid[np.argmin(CHINCHILLA.loss(grid, compute / (6 * grid)))]
        assert n == pytest.approx(brute, rel=1e-3)
        assert CHINCHILLA.optimal_tokens(float(n)) == pytest.approx(d, rel=1e-9)
        assert CHINCHILLA.optimal_params(float(d)) == pytest.approx(n, rel=1e-9)
    assert CHINCHILLA.params_exponent == pytest.approx(0.28 / 0.62)


def test_plan_for_a_compute_budget():
    law_row, rule_row = plan(compute=1e21)
    assert law_row.compute == pytest.approx(1e21) and rule_row.compute == pytest.approx(1e21)
    assert rule_row.tokens_per_param == pytest.approx(20.0)
    assert law_row.loss <= rule_row.loss  # the law's optimum is optimal under the law
    assert law_row.loss == pytest.approx(CHINCHILLA.loss(law_row.params, law_row.tokens))
    given, optimum, _ = plan(params=135e6, tokens=2e12)
    assert given.method == "as given" and given.compute == pytest.approx(6 * 135e6 * 2e12)
    assert optimum.compute == pytest.approx(given.compute) and optimum.loss < given.loss
    assert plan(params=1e9)[1].tokens == pytest.approx(2e10)
    assert plan(tokens=1e12, tokens_per_param=10)[1].params == pytest.approx(1e11)


def test_plan_rejects_bad_budgets():
    with pytest.raises(ScalingError, match="give a budget"):
        plan()
    with pytest.raises(ScalingError, match="--compute alone"):
        plan(compute=1e20, params=1e9)
    with pytest.raises(ScalingError, match="--params must be a positive number"):
        plan(params=-5)


def test_plan_cli(capsys):
    assert lmforge("plan", "--compute", "1e21") == 0
    out = capsys.readouterr().out
    assert "Chinchilla law optimum" in out and "20 tokens/parameter" in out and "406.4" in out
    assert lmforge("plan", "--params", "135M", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["params"] == 135e6 and rows[1]["tokens_per_param"] == pytest.approx(20)


# ------------------------------------------------------------------------------ the fit
def _grid(law: LossLaw, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 5), np.geomspace(1e8, 1e11, 5)))
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, len(n)))
    return n, d, loss


def test_fit_recovers_the_constants_it_was_drawn_from():
    true = LossLaw(E=1.8, A=482.0, B=2085.0, alpha=0.35, beta=0.37)
    result = fit_loss_law(*_grid(true), refine=4)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(result.law, name) == pytest.approx(getattr(true, name), rel=1e-4), name
    assert result.rms_log_residual < 1e-6 and result.starts == 4500


def test_fit_with_noise_stays_close_and_a_bad_run_barely_moves_it():
    true = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    n, d, loss = _grid(true, noise=0.003)
    loss[3] *= 1.5  # one broken run: the Huber loss treats it linearly, not quadratically
    law = fit_loss_law(n, d, loss, refine=8).law
    assert law.alpha == pytest.approx(0.34, abs=0.03) and law.beta == pytest.approx(0.28, abs=0.03)
    irreducible = law.E
    assert irreducible == pytest.approx(1.69, abs=0.1)
    assert law.params_exponent == pytest.approx(true.params_exponent, abs=0.03)


def test_fit_needs_enough_runs():
    with pytest.raises(ScalingError, match="at least 5 runs over at least 2 model sizes and 2 token budgets"):
        fit_loss_law([1e6] * 6, [1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7], [3, 2.9, 2.8, 2.7, 2.6, 2.5])
    with pytest.raises(ScalingError, match="finite positive loss"):
        fit_loss_law([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, float("nan")])


def test_fit_cli_reads_results_and_writes_the_plot(tmp_path, capsys):
    true = LossLaw(E=2.0, A=300.0, B=900.0, alpha=0.4, beta=0.3)
    n, d, loss = _grid(true)
    records = [{"run": f"r{i}", "params": 2 * a, "non_embedding_params": a, "tokens": b, "val_loss": c}
               for i, (a, b, c) in enumerate(zip(n, d, loss))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert lmforge("fit", str(tmp_path), "--refine", "4") == 0
    out = capsys.readouterr().out
    assert "Chinchilla" in out and "406.4" in out and "compute-optimal under the fit" in out
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert lmforge("fit", str(tmp_path / "results.jsonl"), "--json", "--no-plot", "--refine", "4",
                   "--params", "total") == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["law"]["alpha"] == pytest.approx(0.4, rel=1e-3)  # N doubled: only A changes
    assert fitted["law"]["A"] == pytest.approx(300.0 * 2**0.4, rel=1e-3)
    (tmp_path / "bad.jsonl").write_text('{"params": 1}\n')
    with pytest.raises(ScalingError, match="record 1 lacks non_embedding_params, tokens, val_loss"):
        read_results(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------ the sweep
def test_sizes_and_budgets_parse():
    assert parse_sizes("64x2, 128X4") == [(64, 2), (128, 4)]
    assert parse_tokens("2e5,500K,1.5M") == [200_000, 500_000, 1_500_000]
    with pytest.raises(ScalingError, match="not D_MODELxN_LAYERS"):
        parse_sizes("64")
    with pytest.raises(ScalingError, match="not a number of tokens"):
        parse_tokens("lots")


def test_sized_models_keep_the_family():
    base = {"preset": "llama-tiny", "vocab_size": 2048, "d_model": 64, "n_heads": 2, "n_kv_heads": 1,
            "d_ff": 172}
    wide = model_config(sized_model(base, 128, 3))
    assert (wide.n_heads, wide.kv_heads, wide.dim_per_head, wide.n_layers) == (4, 2, 32, 3)
    assert wide.d_ff == 344 and wide.mlp == "swiglu"
    with pytest.raises(ScalingError, match="not a multiple of the base model's head size 32"):
        sized_model(base, 48, 2)


def _sweep(shards: Path, output: Path, tokens: str, capsys, *extra: str) -> list[dict]:
    overrides = [f"--data.folder={shards}", "--model.vocab_size=384", "--model.max_seq_len=64",
                 "--train.seq_len=32", "--train.micro_batch=4", "--train.batch_tokens=128",
                 "--train.eval_batches=2", "--train.device=cpu", *extra]
    assert lmforge("sweep", "-c", str(SWEEP_CONFIG), "--sizes", "32x1,64x1", "--tokens", tokens,
                   "-o", str(output), "--threads", "1", *overrides) == 0
    capsys.readouterr()
    return read_results(output)


def test_sweep_end_to_end_is_resumable(shards, tmp_path, capsys):
    out = tmp_path / "sweep"
    records = _sweep(shards, out, "640,1280", capsys)
    assert [(r["d_model"], r["tokens"], r["steps"]) for r in records] == [
        (32, 640, 5), (32, 1280, 10), (64, 640, 5), (64, 1280, 10)]
    for r in records:
        config = model_config(sized_model({"preset": "llama-tiny", "vocab_size": 384, "d_model": 64,
                                           "n_heads": 2, "n_kv_heads": 1, "d_ff": 172, "max_seq_len": 64},
                                          r["d_model"], 1))
        assert r["params"] == config.num_parameters()
        assert r["non_embedding_params"] == config.num_parameters(include_embeddings=False)
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(384) + 0.5
    assert [r["lr"] for r in records] == [1e-2, 1e-2, 5e-3, 5e-3]  # the recipe's 5e-3 at d_model 64, x 64/d
    assert (out / "results.csv").read_text().splitlines()[0].startswith("run,d_model,n_layers")
    with pytest.raises(ScalingError, match=r"trained with another recipe \(optim.lr: 0.01 there, 0.02 now"):
        _sweep(shards, out, "640", capsys, "--optim.lr=1e-2")  # finished runs are never mixed with new ones

    summary = out / "runs" / "d64-l1-t1.28K" / "summary.json"
    trained_at = summary.stat().st_mtime_ns
    (out / "runs" / "d32-l1-t640" / "summary.json").unlink()  # died after its last checkpoint
    again = _sweep(shards, out, "640,1280,2560", capsys)  # rerun, one budget more
    assert summary.stat().st_mtime_ns == trained_at  # finished runs are not retrained
    assert len(again) == 6
    by_name = {r["run"]: r for r in again}
    assert by_name["d32-l1-t640"]["val_loss"] == records[0]["val_loss"]  # recovered from its metrics


def test_sweep_without_a_validation_split_is_a_clear_error(tmp_path, shards):
    import shutil

    folder = tmp_path / "noval"
    shutil.copytree(shards, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] = 0
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ScalingError, match="has no validation split"):
        lmforge("sweep", "-c", str(SWEEP_CONFIG), "--sizes", "32x1", "--tokens", "640", "-o",
                str(tmp_path / "out"), f"--data.folder={folder}")
