"""Answers as models write them: thousands separators, scientific notation, stated answers, math around a number,
big whole numbers; each case is what a grader reading the completion would call right or wrong."""

from __future__ import annotations

import math

import pytest

from minigrpo.answers import answer_number, answers_match, extract_answer, reference_answer, to_number
from minigrpo.reward_fns import correctness, int_answer, proximity


def call(fn, completions, answers):
    return fn([""] * len(completions), completions, answers)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 000", 1000.0),  # a space between thousands
        ("-1 234 567.5", -1234567.5),
        ("1\u2009000", 1000.0),  # thin space
        ("1\u00a0000", 1000.0),  # no-break space
        ("1\\,000", 1000.0),  # LaTeX thin space
        ("$1\\,234.50", 1234.5),
        ("12 34", None),  # not thousands groups
        ("1.5 \\times 10^{3}", 1500.0),
        ("2.5\u00d710^-3", 0.0025),
        ("-4 \\cdot 10^2", -400.0),
        ("3*10**2", 300.0),
        ("1.5 \\times 10^{999}", None),  # not finite
    ],
)
def test_to_number_reads_spaced_thousands_and_scientific_notation(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("The answer is 1 000.", "1000", 2.0),  # was read as its last group, "000" = 0
        ("The answer is 1 000.", "0", 0.0),
        ("So she pays 12\u2009345 dollars.", "12345", 2.0),
        ("<answer>1 000</answer>", "1000", 2.0),
        ("<answer>6.02 \\times 10^{23}</answer>", "6.02e23", 2.0),
    ],
)
def test_correctness_reads_spaced_thousands_and_scientific_notation(completion, answer, reward):
    assert call(correctness, [completion], [answer]) == [reward]


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("The answer is 18. Check: 18 * 2 = 36", "18", 2.0),  # a check after the stated answer
        ("**Final Answer:** $1,234.50\nVerification: 1234.5 - 34.5 = 1200", "1234.5", 2.0),
        ("The answer is $\\frac{1}{2}$. Indeed 2 * 0.5 = 1", "0.5", 2.0),
        ("Answer: 18 apples, since 3 + 15 = 18", "18", 2.0),
        ("The answer is 18. Check: 18 * 2 = 36", "36", 0.0),
        # the phrase followed by a working, not one number: the last number counts
        ("Let me find the answer: first 3 + 4 = 7, so 7 * 2 = 14", "14", 2.0),
        ("The answer was wrong before; now 5 + 2 = 7", "7", 2.0),
    ],
)
def test_the_stated_answer_counts_over_the_last_number(completion, answer, reward):
    assert call(correctness, [completion], [answer]) == [reward]


def test_a_stated_answer_is_no_marked_answer_for_int_answer():
    assert extract_answer("The answer is 18. Then 2.5", last_number=False) is None
    assert call(int_answer, ["The answer is 18. Then 2.5"], ["18"]) == [0.0]


@pytest.mark.parametrize(
    ("pred", "ref"),
    [("\\sqrt{4}", "4"), ("x^2", "2"), ("2\\pi", "2"), ("\\log 8", "8"), ("\u221a9", "9"), ("sqrt(16)", "16")],
)
def test_math_around_a_lone_number_is_no_match(pred, ref):
    assert answer_number(pred) is None
    assert not answers_match(pred, ref)
    assert call(correctness, [f"<answer>{pred}</answer>"], [ref]) == [0.0]


def test_units_and_degrees_around_a_lone_number_still_match():
    assert answer_number("18^\\circ") == 18.0
    assert answers_match("18 \\text{ dollars}", "18") and answers_match("x = 18", "18")


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("1219253924", "1219253925", False),  # 12345 * 98765, off by one: rel error 8e-10 < 1e-9
        ("1,000,000,001", "1000000000", False),
        ("1219253925.0", "1219253925", True),
        ("$1,000,000,000", "1000000000", True),
        ("0.1", "0.1000000000001", True),  # float rounding of non-whole values is still tolerated
    ],
)
def test_whole_numbers_must_be_equal(pred, ref, match):
    assert answers_match(pred, ref) is match
    assert call(correctness, [f"<answer>{pred}</answer>"], [ref]) == [2.0 * match]


def test_a_nan_reference_is_no_reference():
    """A missing answer cell read as NaN (pandas) is no reference: masked, and "nan" is no correct answer."""
    assert reference_answer(math.nan) is None
    assert call(correctness, ["<answer>nan</answer>", "<answer>5</answer>"], [math.nan, math.nan]) == [None, None]
    assert call(proximity, ["<answer>5</answer>"], [float("nan")]) == [None]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2 1/2", 2.5),
        ("-2 1/2", -2.5),
        ("3\\frac{1}{2}", 3.5),
        ("\\boxed{3\\dfrac{1}{4}}", 3.25),
        ("$1 3/4$", 1.75),
        ("2 3/2", None),  # an improper fraction after a whole part is no mixed number
        ("12 34", None),  # nor two numbers
    ],
)
def test_mixed_numbers_as_whole_answers(text, value):
    assert to_number(text) == value


def test_a_mixed_number_answer_matches_its_decimal():
    completions = ["<answer>2 1/2</answer>", "<answer>2.5</answer>", "<answer>2 1/3</answer>"]
    assert call(correctness, completions, ["2.5"] * 3) == [2.0, 2.0, 0.0]
