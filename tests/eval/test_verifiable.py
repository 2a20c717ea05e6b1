"""Verifiable tasks: held-out problems never reach training, and rewards follow reasoning-gym's scoring."""

import pytest

from lmforge.eval.verifiable import (
    HOLDOUT_EVERY,
    REASONING_GYM_TASKS,
    SYSTEM_PROMPT,
    TASKS,
    ReasoningGymTask,
    TaskError,
    get_task,
    problem_identity,
    split_of,
)


@pytest.mark.parametrize("name", REASONING_GYM_TASKS)
def test_held_out_problems_are_never_in_a_train_split(name):
    task = get_task(name)
    train = [p for seed in range(3) for p in task.problems("train", 150, seed)]
    test = [p for seed in range(2) for p in task.problems("test", 40, seed)]
    # ids and keys: disjoint ranges
    assert {p.id for p in train}.isdisjoint(p.id for p in test)
    assert all(p.metadata["key"] < 2**31 for p in train)
    assert all(2**31 <= p.metadata["key"] < 2**32 for p in test)
    # the problems themselves: each split holds only its own side of the hash, by question and by identity
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    identities = [{problem_identity(p.metadata["entry"]) for p in side} for side in (train, test)]
    assert identities[0].isdisjoint(identities[1])
    assert {split_of(i) for i in identities[0]} == {"train"}
    assert {split_of(i) for i in identities[1]} == {"test"}


def test_a_small_problem_space_still_keeps_the_splits_apart():
    """chain_sum with two one-digit terms has 200 questions, so different keys repeat questions: the
    key ranges alone would leak test questions into training; the text split does not."""
    task = get_task("chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    test = task.problems("test", 12, seed=0)
    raw_train_range = {task.entry(key)["question"] for key in range(2000)}  # keys of the train range
    assert raw_train_range & {p.question for p in test}, "the generator repeats questions across key ranges"
    train = task.problems("train", 150, seed=0)  # most of the space on the train side
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    assert len({p.question for p in train}) == 150  # distinct within a split
    with pytest.raises(TaskError, match="only .* distinct test problems"):
        task.problems("test", 60, seed=0)  # the test side has about 200 / HOLDOUT_EVERY questions


def test_two_phrasings_of_one_sum_are_one_problem():
    """basic_arithmetic's natural style asks "What is X?" or "Compute X.": the expression decides."""
    natural = get_task("basic_arithmetic", format_style="natural", min_terms=2, max_terms=2, max_digits=1,
                       allow_parentheses=False)
    test = natural.problems("test", 10, seed=0)
    train = natural.problems("train", 120, seed=0)
    expressions = [{p.metadata["entry"]["metadata"]["expression"] for p in side} for side in (train, test)]
    assert expressions[0].isdisjoint(expressions[1])
    assert len(expressions[0]) == 120  # one phrasing of each sum per split
    phrasings = {}
    for key in range(3000):  # the generator does phrase one sum in several ways
        entry = natural.entry(key)
        phrasings.setdefault(entry["metadata"]["expression"], set()).add(entry["question"])
    assert max(len(q) for q in phrasings.values()) > 1
    assert problem_identity({"question": "What is 3 + 4?", "metadata": {"expression": "3 + 4"}}) == \
        problem_identity({"question": "Compute 3+4.", "metadata": {"expression": "3+4"}})


def test_about_one_problem_in_holdout_every_is_held_out():
    task = get_task("gsm_symbolic")
    identities = {problem_identity(task.entry(key)) for key in range(2000)}
    share = sum(split_of(i) == "test" for i in identities) / len(identities)
    assert abs(share - 1 / HOLDOUT_EVERY) < 0.025


def test_problems_are_reproducible_and_seeds_differ():
    task = get_task("gsm_symbolic")
    first, again, other = (task.problems("train", 20, s) for s in (0, 0, 1))
    assert [p.id for p in first] == [p.id for p in again]
    assert [p.question for p in first] == [p.question for p in again]
    assert {p.id for p in first}.isdisjoint(p.id for p in other)
    assert len({p.question for p in first}) == 20


def test_problem_prompt_asks_for_a_boxed_answer():
    problem = get_task("chain_sum").problems("test", 1)[0]
    assert problem.prompt == [{"role": "system", "content": SYSTEM_PROMPT},
                              {"role": "user", "content": problem.question}]
    assert "\\boxed{}" in SYSTEM_PROMPT
    entry = problem.metadata["entry"]
    assert (entry["question"], entry["answer"]) == (problem.question, problem.answer)
    assert problem.answer == str(eval(entry["metadata"]["expression"]))  # chain_sum is + and - only


def test_grade_uses_the_extracted_answer_in_canonical_form():
    task = get_task("basic_arithmetic")
    problem = next(p for p in task.problems("test", 30) if abs(int(p.answer)) >= 1000)
    gold = int(problem.answer)
    right = task.grade(problem, f"Working... 1 + 2 = 3.\nThe answer is {gold:,}.00.")
    assert (right.answer, right.score, right.correct, right.formatted) == (f"{gold:,}.00", 1.0, True, False)
    boxed = task.grade(problem, f"first \\boxed{{{gold + 1}}}, then \\boxed{{{gold}}}")
    assert boxed.correct and boxed.formatted and boxed.answer == str(gold)
    wrong = task.grade(problem, f"\\boxed{{{gold}7}}")  # contains the gold: reasoning-gym's partial credit
    assert not wrong.correct and wrong.formatted
    assert wrong.score == pytest.approx(len(problem.answer) / (len(problem.answer) + 1))
    nothing = task.grade(problem, "I cannot say.")
    assert (nothing.answer, nothing.score, nothing.correct) == (None, 0.0, False)
    strict = get_task("basic_arithmetic", partial_credit=False)  # 1 or 0, as a reward may prefer
    assert strict.grade(problem, f"\\boxed{{{gold}7}}").score == 0.0
    assert strict.grade(problem, f"\\boxed{{{gold}}}").score == 1.0


def test_gsm_symbolic_scores_like_reasoning_gym():
    task = get_task("gsm_symbolic")
    problem = task.problems("test", 1, seed=3)[0]
    gold = problem.answer
    assert task.grade(problem, f"#### {gold}").score == 1.0
    assert task.grade(problem, f"The answer is ${float(gold):,.2f}.").correct
    assert task.grade(problem, f"#### {float(gold) + 1}").score == 0.01  # any number: 0.01 (its design)


def test_format_reward_is_a_separate_small_term():
    plain, shaped = get_task("chain_sum"), get_task("chain_sum", format_weight=0.1)
    problem = plain.problems("test", 1)[0]
    wrong = str(int(problem.answer) + 1)
    assert plain.reward(problem, f"\\boxed{{{problem.answer}}}") == 1.0
    assert shaped.reward(problem, f"\\boxed{{{problem.answer}}}") == pytest.approx(1.1)
    assert shaped.reward(problem, f"The answer is {problem.answer}.") == 1.0  # right, not boxed
    assert shaped.reward(problem, f"\\boxed{{{wrong}}}") == pytest.approx(
        0.1 + plain.grade(problem, f"\\boxed{{{wrong}}}").score)  # boxed, wrong: the bonus only
    with pytest.raises(TaskError, match="format_weight"):
        get_task("chain_sum", format_weight=2.0)


def test_errors_name_the_problem_and_the_choices():
    with pytest.raises(TaskError, match="unknown task 'gsm8k'; known: gsm_symbolic, basic_arithmetic, "
                                        "chain_sum, mmath"):
        get_task("gsm8k")
    with pytest.raises(TaskError, match="no option max_term; its options: .*max_terms"):
        get_task("chain_sum", max_term=3)
    with pytest.raises(TaskError, match="bad chain_sum options"):
        get_task("chain_sum", max_terms=0)
    with pytest.raises(TaskError, match="no option seed"):
        get_task("chain_sum", seed=3)  # the key is the seed: not an option
    task = get_task("chain_sum")
    with pytest.raises(TaskError, match="unknown split 'validation'; known: train, test"):
        task.problems("validation", 3)
    with pytest.raises(TaskError, match="positive number"):
        task.problems("train", 0)
    with pytest.raises(TaskError, match="reasoning-gym has no dataset"):
        ReasoningGymTask("no_such_dataset")
    assert set(TASKS) == {"gsm_symbolic", "basic_arithmetic", "chain_sum", "mmath"}
