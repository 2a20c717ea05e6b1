"""Answer extraction and comparison on the formats models actually write."""

from fractions import Fraction

import pytest

from lmforge.eval.answers import (
    answers_match,
    canonical_answer,
    clean_answer,
    extract_answer,
    has_boxed_answer,
    parse_number,
)


@pytest.mark.parametrize(("completion", "expected"), [
    # \boxed: nested braces kept whole, the last box wins, \fbox and an unbraced \boxed 5
    (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"First \boxed{3}, no wait: \boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{{5}} then \boxed{7", "5"),  # the last box is cut off: the complete one before it
    (r"\fbox{12}", "12"),
    (r"Hence \boxed 5.", "5"),
    (r"\boxed{1,234}", "1,234"),
    # the other explicit markers, each beating stray numbers around it
    ("3 + 4 = 7\n#### 42", "42"),
    ("#### 7\nmore work... #### 1,234\n", "1,234"),
    ("<answer> 42 </answer> (I checked 6 x 7)", "42"),
    ("<answer>1</answer> hmm <answer>2</answer>", "2"),
    ("Reasoning...\n<answer>17", "17"),  # stopped at the closing tag
    ("We add 2 and 3. The answer is 5.", "5"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is 5. No wait, the answer is 6.", "6"),  # two on one line: the last
    ("The answer is\n7", "7"),  # nothing after the marker on its line: the last number
    ("The answer is 3.50", "3.50"),
    ("The answer is $1,200.00.", "1,200.00"),
    ("Final answer: -12", "-12"),
    ("**Answer:** 25%", "25%"),
    ("The answer is: 42 because 6 * 7 = 42", "42"),
    ("The answer is $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("The answer is 4\\!\\,000", "4000"),
    ("Answer: (C)", "(C)"),
    ("Answer: let me think about it. 3 + 4 = 7", "7"),  # prose after "Answer:": the last number
    # no marker: the last number, negatives and fractions included, not an operator's minus sign
    ("First 3 apples, then 4, so 12 in all.", "12"),
    ("5-3=2", "2"),
    ("so x = -5", "-5"),
    ("It is 3/4 of the cake", "3/4"),
    ("half of it: $\\dfrac{1}{2}$", r"\frac{1}{2}"),
    ("Total: 1,234,567 people.", "1,234,567"),
    ("It costs $3.50.", "3.50"),
    # nothing to find
    ("I don't know the answer.", None),
    ("", None),
    (None, None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(("answer", "value"), [
    ("42", Fraction(42)),
    ("-42", Fraction(-42)),
    ("1,234", Fraction(1234)),
    ("1,234,567.5", Fraction(2469135, 2)),
    ("3.50", Fraction(7, 2)),
    ("3.5", Fraction(7, 2)),
    (".5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)),
    ("3/-4", Fraction(-3, 4)),
    (r"\frac{3}{4}", Fraction(3, 4)),
    (r"\dfrac{3}{4}", Fraction(3, 4)),
    (r"\tfrac34", Fraction(3, 4)),
    (r"-\frac{7}{2}", Fraction(-7, 2)),
    ("25%", Fraction(25)),
    (r"25\%", Fraction(25)),
    ("$1,200.00", Fraction(1200)),
    ("-$5", Fraction(-5)),
    ("£195", Fraction(195)),
    ("12 apples", Fraction(12)),
    (r"5 \text{ cm}", Fraction(5)),
    (r"90^\circ", Fraction(90)),
    ("x = 5", Fraction(5)),
    ("1e3", Fraction(1000)),
    ("\u22124", Fraction(-4)),  # a typographic minus
    ("42.", Fraction(42)),
    # not one number
    ("1,2", None),  # a list, not a thousands separator
    ("12,34", None),
    ("3x", None),
    (r"\frac{\sqrt{3}}{2}", None),
    ("(3, 4)", None),
    ("1/0", None),
    ("", None),
    (None, None),
])
def test_parse_number(answer, value):
    assert parse_number(answer) == value


@pytest.mark.parametrize(("predicted", "gold", "same"), [
    ("3.50", "3.5", True),
    ("7/2", "3.5", True),
    (r"\dfrac{7}{2}", "3.5", True),
    ("1,234", "1234", True),
    ("$1,200.00", "1200", True),
    ("25%", "25", True),
    ("-12", "12", False),
    ("12", "-12", False),
    ("0.333", "1/3", False),  # exact rationals: no tolerance
    ("3", "$3$", True),  # MMATH writes some gold answers in math delimiters
    (r"\frac{\sqrt6}{4}", r"$\frac{\sqrt{6}}{4}$", True),
    (r"\dfrac{ \sqrt{3} }{ 2 }", r"\frac{\sqrt{3}}{2}", True),
    (r"2\sqrt{2}-2", r"$2\sqrt{2} - 2$", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    ("(C)", r"\text{(C)}", True),
    ("(B)", "(C)", False),
    (None, "5", False),
])
def test_answers_match(predicted, gold, same):
    assert answers_match(predicted, gold) is same


@pytest.mark.parametrize(("answer", "canonical"), [
    ("$1,200.00", "1200"), ("3.50", "3.5"), ("3/4", "0.75"), (r"\frac13", "1/3"), ("-0.05", "-0.05"),
    ("-1/8", "-0.125"), ("1687.5", "1687.5"), (r"\text{(C)}.", "(C)"), (None, None),
])
def test_canonical_answer(answer, canonical):
    assert canonical_answer(answer) == canonical


def test_canonical_answer_is_one_spelling_per_value():
    spellings = ["0.75", "3/4", r"\frac{3}{4}", r"\dfrac34", ".750", "6/8", "$0.75"]
    assert {canonical_answer(s) for s in spellings} == {"0.75"}
    assert all(parse_number(canonical_answer(s)) == Fraction(3, 4) for s in spellings)


def test_clean_answer_and_boxed_format():
    assert clean_answer(r" **$\left(1,\!2\right)$**. ") == "(1,2)"
    assert has_boxed_answer(r"so \boxed{4}")
    assert not has_boxed_answer(r"so \boxed{4")  # cut off: not the format asked for
    assert not has_boxed_answer("The answer is 4.")
