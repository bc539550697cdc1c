"""Answer forms a careful grader reads past: percents against fractions, units on either side, decimal commas,
bounds, equations, scientific notation as the last number, and completions that are None."""

from __future__ import annotations

import pytest

from minigrpo.answers import answer_number, answers_match, extract_answer, to_number
from minigrpo.reward_fns import REWARDS, correctness, int_answer, make_length_penalty, proximity
from minigrpo.rewards import RewardSpec, score


def call(fn, completions, answers, **columns):
    return fn([""] * len(completions), completions, answers, **columns)


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("50", "50%", True),
        ("50%", "50%", True),
        ("0.5", "50%", True),  # the fraction a percent reference stands for
        ("1/2", "50\\%", True),
        ("0.125", "12.5 percent", True),
        ("1", "100%", True),
        ("0.5%", "50%", False),  # a half percent is not fifty
        ("0.5", "5%", False),
        ("50%", "0.5", True),  # a predicted percent equals the fraction it is
        ("0.5%", "0.005", True),
        ("50%", "50", True),  # against a bare reference the sign reads as a unit
        ("0.5", "50", False),  # a bare reference is not loosened
        ("50", "0.5", False),
        ("100%", "1", False),  # nor is a whole one: 100% is no answer to "how many"
    ],
)
def test_a_percent_matches_the_fraction_it_stands_for(pred, ref, match):
    assert answers_match(pred, ref) is match
    assert call(correctness, [f"<answer>{pred}</answer>"], [ref]) == [2.0 * match]


def test_proximity_reads_a_percent_reference_as_correctness_does():
    # 0.5 against "50%": exact as a fraction (was 2 * 2**(-49.5/50/0.1) - 1 = -0.998)
    assert call(proximity, ["<answer>0.5</answer>", "<answer>0.55</answer>"], ["50%", "50%"]) == pytest.approx(
        [1.0, 2.0 * 2.0 ** (-0.05 / 0.1) - 1.0], abs=1e-12
    )


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("18", "18 dollars", True),  # a reference with units (was compared as text: no match)
        ("18", "$18", True),
        ("$18.00", "18 dollars", True),
        ("5", "5 cm", True),
        ("3", "3 hours", True),
        ("3 hours", "3", True),
        ("4", "3 hours", False),
        ("18 dollars", "20 dollars", False),
        ("5 cm^2", "5", True),  # the power belongs to the unit (was two numbers, 5 and 2)
        ("5\\text{ m}^{2}", "5 m^2", True),
        ("5 ft\u00b2", "5", True),
        ("5cm^3", "5", True),
        ("x^2", "2", False),  # a power of a variable is still math
    ],
)
def test_units_are_read_past_on_both_sides(pred, ref, match):
    assert answers_match(pred, ref) is match
    assert call(correctness, [f"<answer>{pred}</answer>"], [ref]) == [2.0 * match]


def test_proximity_scores_a_reference_with_units():
    """A reference "18 dollars" is the number 18, not an unscorable text (was None: masked on every row)."""
    assert call(proximity, ["<answer>18</answer>", "<answer>20</answer>"], ["18 dollars", "$18"]) == pytest.approx(
        [1.0, 2.0 * 2.0 ** (-(2 / 18) / 0.1) - 1.0], abs=1e-12
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3,5", 3.5),  # a decimal comma: 1 digit after it cannot be a thousands group
        ("-0,25", -0.25),
        ("3{,}5", 3.5),  # LaTeX's decimal comma
        ("12,5000", 12.5),
        ("1.234,5", 1234.5),  # thousands grouped by dots, then the decimal comma
        ("1 234,56", 1234.56),
        ("\\boxed{2,75}", 2.75),
        ("1,000", 1000.0),  # three digits after one comma: thousands, as before
        ("12,345", 12345.0),
        ("1{,}234", 1234.0),
        ("1,000.5", 1000.5),
        ("1234,567", None),  # neither a grouping nor a decimal mark anyone writes
        ("1,000,5", None),
        ("1,2,3", None),
    ],
)
def test_a_comma_is_a_decimal_mark_only_where_it_cannot_group_thousands(text, value):
    assert to_number(text) == value


def test_decimal_comma_answers_score():
    completions = ["<answer>3,5</answer>", "The answer is 3,5.", "<answer>1,000</answer>", "<answer>3,5</answer>"]
    assert call(correctness, completions, ["3.5", "3.5", "1000", "35"]) == [2.0, 2.0, 2.0, 0.0]
    assert answers_match("3.5", "3,5") and not answers_match("1,5", "15")


@pytest.mark.parametrize("pred", ["x > 5", "x \\ge 5", "x \\leq 5", "x <= 5", "5 < x", "x \u2265 5", "x \\neq 5"])
def test_a_bound_is_no_number(pred):
    assert answer_number(pred) is None
    assert call(correctness, [f"\\boxed{{{pred}}}"], ["5"]) == [0.0]
    assert call(int_answer, [f"\\boxed{{{pred}}}"], ["5"]) == [0.0]


def test_markup_around_an_answer_is_no_bound():
    assert answer_number("<b>18</b>") == 18.0
    assert answer_number('<span class="ans">18</span>') == 18.0


@pytest.mark.parametrize(
    ("answer", "reward"),
    [
        ("9 * 2 = 18", 2.0),  # what the working equals (was two numbers: no answer)
        ("$9 \\times 2 = 18$", 2.0),
        ("x = 18", 2.0),
        ("\\frac{36}{2} = 18", 2.0),
        ("2x = 18", 0.0),  # an equation to solve: x is 9
        ("x = 1, y = 18", 0.0),  # two answers
        ("x <= 18", 0.0),  # a bound
        ("18 = 9 \\times 2", 0.0),
        ("18 = x", 2.0),
        ("9 x 2 = 18", 2.0),  # "x" between digits is a times sign
        ("2 \\cdot x = 18", 0.0),
    ],
)
def test_an_equation_answer_is_what_it_equals(answer, reward):
    assert call(correctness, [f"<answer>{answer}</answer>"], ["18"]) == [reward]


def test_an_equation_to_solve_is_no_answer():
    assert answer_number("x^2 = 4") is None and answer_number("x + 3 = 7") is None
    assert call(correctness, ["<answer>x^2 = 4</answer>", "<answer>x + 3 = 7</answer>"], ["4", "7"]) == [0.0, 0.0]


def test_a_working_after_the_answer_phrase_is_no_stated_answer():
    assert extract_answer("Let me find the answer: first 3 + 4 = 7, so 7 * 2 = 14") == "14"


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The result is 2 \\times 10^3", "2000"),  # was read as its exponent, 3
        ("So there are 6.02 \\times 10^{23} atoms.", "6.02e23"),
        ("The speed is about 3x10**5 km/s", "300000"),
        ("It is 2 \\times 10^{-3} m", "0.002"),
        ("First 5 x 10^2 = 500", "500"),
    ],
)
def test_the_last_number_in_scientific_notation_is_the_whole_product(completion, answer):
    assert call(correctness, [completion], [answer]) == [2.0]


def test_non_string_and_full_solution_references_match():
    """A reference may come as a number (a JSON int) or as a whole GSM8K solution (was: AttributeError)."""
    assert answers_match("72", 72) and answers_match("72.0", 72.0) and not answers_match("71", 72)
    assert answers_match("$72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72")


def test_a_none_completion_is_unscored_by_every_builtin():
    """No text is no score: each built-in returns None for it (was a TypeError, or an AttributeError)."""
    columns = {"max_completion_length": [10, 10]}
    for name, fn in REWARDS.items():
        out = call(fn, [None, "<answer>7</answer>"], ["7", "7"], **columns)
        assert out[0] is None and isinstance(out[1], float), name
    assert call(make_length_penalty(max_length=10), [None], ["7"]) == [None]
    result = score(["p", "q"], [None, "<answer>7</answer>"], ["7", "7"], [RewardSpec("correctness", timeout_s=None)])
    assert result.failures == {"correctness": 0} and result.nones == {"correctness": 1}
    assert result.total.tolist()[1] == 2.0 and extract_answer(None) is None


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("#### Step 1\nShe sells 9 eggs.\n#### Step 2\nSo she makes 9 * 2 = 18", 2.0),  # was read as "Step 2": 2
        ("#### Final answer\nThe answer is 18.", 2.0),  # was "Final answer": no number
        ("#### Final Answer: 18", 2.0),
        ("She makes 18 dollars.\n#### 18", 2.0),  # the GSM8K marker as before
        ("#### Step 1\n9 * 2 = 18\n#### 20", 0.0),
    ],
)
def test_a_markdown_heading_is_no_answer_marker(completion, reward):
    assert call(correctness, [completion], ["18"]) == [reward]


def test_a_negated_stated_answer_is_no_answer():
    text = "At first I thought the answer is 18, but the answer is not 18. It is 20."
    assert extract_answer(text) == "20"
    assert call(correctness, [text, text], ["18", "20"]) == [0.0, 2.0]
