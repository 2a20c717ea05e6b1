"""`lmforge align`: each algorithm end to end through the CLI on a tiny model, resume, the outputs,
the before/after measurements, and one-line errors for what cannot work."""

from __future__ import annotations

import json
import math

import pytest
from tests.align.conftest import save_hf_folder, tiny_llama

from lmforge.align.reward import is_reward_folder
from lmforge.cli import main

TINY_TRAIN = ["--train.seq_len=128", "--train.batch_tokens=512", "--train.micro_batch=4",
              "--train.eval_interval=0", "--train.log_interval=1", "--train.checkpoint_interval=2",
              "--data.eval_problems=0"]


@pytest.fixture
def model_folder(tmp_path):
    return save_hf_folder(tiny_llama(0), tmp_path / "base")


def _pairs_file(tmp_path, n: int = 40):
    rows = [{"prompt": f"Say {c}: ", "chosen": c * 3, "rejected": "xyz"[i % 3] * 3}
            for i, c in enumerate("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"[:n])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(argv, capsys) -> dict:
    assert main(["align", *argv, "--quiet", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dpo_trains_an_adapter_from_ln2_and_resumes(model_folder, tmp_path, capsys):
    out = tmp_path / "dpo"
    argv = ["dpo", "--model", str(model_folder), "--data", str(_pairs_file(tmp_path)), "-o", str(out),
            *TINY_TRAIN, "--optim.lr=5e-3", "--data.val_fraction=0.25"]
    first = _run([*argv, "--train.steps=2"], capsys)
    # policy == reference before training: the held-out sigmoid loss is ln 2, the rewards 0
    assert first["held_out_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["held_out_before"]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "metrics.png").exists()
    summary = _run([*argv, "--train.steps=6"], capsys)  # the same command, more steps: resumes at 2
    assert summary["steps"] == 6 and summary["steps_this_run"] == 4
    assert summary["held_out_after"]["loss"] < math.log(2)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_kto_reads_labelled_rows_and_refuses_pairs(model_folder, tmp_path, capsys):
    rows = [{"prompt": f"Q{i}: ", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)}
            for i in range(24)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run(["kto", "--model", str(model_folder), "--data", str(data), "-o", str(tmp_path / "kto"),
                    *TINY_TRAIN, "--train.steps=2"], capsys)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert main(["align", "kto", "--model", str(model_folder), "--data", str(_pairs_file(tmp_path)),
                 "-o", str(tmp_path / "kto2"), *TINY_TRAIN, "--quiet"]) == 2
    assert "holds pairs" in capsys.readouterr().err


def test_reward_writes_a_classifier_folder_with_held_out_accuracy(model_folder, tmp_path, capsys):
    out = tmp_path / "rm"
    summary = _run(["reward", "--model", str(model_folder), "--data", str(_pairs_file(tmp_path)),
                    "-o", str(out), *TINY_TRAIN, "--train.steps=3", "--optim.lr=1e-3",
                    "--data.val_fraction=0.25"], capsys)
    assert is_reward_folder(out / "model")
    assert 0.0 <= summary["val_accuracy_before"] <= 1.0 and 0.0 <= summary["val_accuracy"] <= 1.0


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_on_a_task_measures_held_out_pass_at_1(algorithm, model_folder, tmp_path, capsys):
    out = tmp_path / algorithm
    rollout = f"--{algorithm}.rollout"
    summary = _run([algorithm, "--model", str(model_folder), "--data", "basic_arithmetic", "-o", str(out),
                    *TINY_TRAIN, "--train.steps=1", "--data.train_problems=8", "--data.eval_problems=4",
                    "--data.eval_max_tokens=8", f"{rollout}.samples_per_prompt=2",
                    f"{rollout}.prompts_per_rollout=2", f"{rollout}.max_new_tokens=8", "--method=full",
                    "--train.eval_tasks=[perplexity]", "--train.eval_task_limit=1"],
                   capsys)
    # a random model gets nothing right; the numbers are measured, not assumed
    assert summary["pass_at_1_before"] == 0.0 and summary["pass_at_1_after"] == 0.0
    assert summary["eval_task"] == "basic_arithmetic" and summary["eval_problems"] == 4
    assert (out / "model" / "config.json").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rollout/tokens_per_s" in r for r in records)
    assert records[-1]["eval/perplexity/perplexity"] > 1  # the policy was scored (PPO: not its value head)


@pytest.mark.parametrize(("argv", "message"), [
    (["dpo", "--data", "basic_arithmetic"], "basic_arithmetic"),  # a task is not a preference file
    (["grpo", "--data", "no_such_task"], "unknown task 'no_such_task'"),
    (["kto", "--data", "onpolicy:basic_arithmetic"], "on-policy pairs are for dpo only"),
    (["dpo", "--data", "x.jsonl", "--set", "reward_model=rm"], "reward_model is for grpo and ppo"),
    (["dpo"], "data.source is required"),
    (["reward", "--data", "x.jsonl", "--set", "train.eval_tasks=[mmlu]"], "a reward model is scored by"),
])
def test_bad_input_is_a_one_line_error(argv, message, model_folder, tmp_path, capsys):
    assert main(["align", *argv, "--model", str(model_folder), "-o", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_onpolicy_pairs_need_a_right_and_a_wrong_answer(model_folder, tmp_path, capsys):
    # a random model answers no arithmetic right, so no problem yields a pair: said, not trained on
    code = main(["align", "dpo", "--model", str(model_folder), "--data", "onpolicy:basic_arithmetic", "-o",
                 str(tmp_path / "op"), *TINY_TRAIN, "--data.train_problems=4", "--data.onpolicy_samples=2",
                 "--data.eval_max_tokens=4", "--quiet"])
    assert code == 2
    assert "no problem had both a right and a wrong answer" in capsys.readouterr().err
