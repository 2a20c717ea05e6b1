"""MMLU: lm-eval's prompts character for character, and the same per-question predictions as lm-eval's
transformers model (HFLM) on the same questions."""

import json

import pytest

from lmforge.eval.lm import EvalModel
from lmforge.eval.mmlu import MMLU, _shots, prompt, read_questions, write_questions


@pytest.fixture(scope="module")
def questions(mmlu_file):
    """21 real questions: the first 7 of three subjects."""
    rows, dropped = read_questions(mmlu_file)
    assert len(rows) == 14042 and dropped == 2
    chosen = []
    for subject in ("abstract algebra", "high school us history", "moral scenarios"):
        chosen += [q for q in rows if q.subject == subject][:7]
    return chosen


@pytest.fixture(scope="module")
def lm_eval_tasks(questions, tmp_path_factory):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    from lmforge.eval.harness import write_mmlu_tasks

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    names = write_mmlu_tasks(folder, questions)
    return get_task_dict(names, TaskManager(include_path=str(folder), include_defaults=False))


def test_rows_are_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer_a": "a"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: needs the text fields answer_b"):
        read_questions(bad)
    row = {"question": "q", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4", "topic": "t"}
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join(json.dumps(row | {"correct_answer": a}) for a in ("answer", "C")))
    rows, dropped = read_questions(odd)
    assert (len(rows), dropped, rows[0].answer) == (1, 1, "C")


@pytest.mark.parametrize("shots", [0, 5])
def test_prompts_are_lm_evals(questions, lm_eval_tasks, shots):
    """lm-eval's own task machinery (our YAML, its Jinja, sampler and delimiters) builds the same requests."""
    for task in lm_eval_tasks.values():
        task.set_config("num_fewshot", shots)
        for doc in task.test_docs():
            q = next(q for q in questions if (q.question, q.choices[0]) == (doc["question"], doc["answer_a"]))
            context = prompt(q, _shots(q, [p for p in questions if p.subject == q.subject], shots))
            assert task.fewshot_context(doc, shots) == context
            requests = task.construct_requests(doc, context)
            assert [r.args for r in requests] == [(context, f" {x}") for x in "ABCD"]


def test_predictions_equal_lm_eval_with_transformers(questions, tiny_hf, tmp_path):
    """Per-question predictions of `lmforge eval`'s MMLU (2-shot: shared prefixes) equal lm-eval's HFLM on
    the same prompts; the log-likelihoods agree to float32 rounding."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    data = write_questions(questions, tmp_path / "mmlu.jsonl")
    result = MMLU([data]).run(EvalModel.load(tiny_hf), shots=2)
    hf = HFLM(pretrained=str(tiny_hf), device="cpu", batch_size=4)
    by_subject = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    contexts = [prompt(q, _shots(q, by_subject[q.subject], 2)) for q in questions]
    instances = [Instance("loglikelihood", {}, (c, f" {x}"), i)
                 for c in contexts for i, x in enumerate("ABCD")]
    theirs = [logp for logp, _greedy in hf.loglikelihood(instances, disable_tqdm=True)]
    for i, record in enumerate(result.records):
        scores = theirs[4 * i:4 * i + 4]
        assert record["predicted"] == "ABCD"[scores.index(max(scores))], record["question"]
        assert record["loglikelihoods"] == pytest.approx(scores, abs=2e-3)
    assert result.metrics["questions"] == 21 and result.metrics["subjects"] == 3
