"""GSM8K references as models write their answers: every reference of the test split, in the forms models use, scores
as right and its near misses as wrong; which number of a completion counts; whole numbers past a float's precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from minigrpo.answers import answers_match, extract_answer
from minigrpo.reward_fns import REWARDS, correctness, proximity

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def call(fn, completions, answers):
    return fn([""] * len(completions), completions, answers)


@pytest.fixture(scope="module")
def gsm8k_solutions() -> list[str]:
    """The full reference solutions of the GSM8K test split (each ends in "#### <answer>")."""
    if not GSM8K_TEST.is_file():
        pytest.skip(f"no GSM8K data at {GSM8K_TEST}")
    return [json.loads(line)["answer"] for line in GSM8K_TEST.read_text().splitlines() if line.strip()]


def right_forms(value: int) -> list[str]:
    """Completions that give `value` as models write it."""
    grouped = f"{value:,}"
    return [
        str(value),
        grouped,
        grouped.replace(",", " "),  # a whole completion with spaced thousands: "1 000", not its last group "000"
        f"{value}.00",
        f"{value}.",
        f"${grouped}",
        f"\\${grouped}",
        f"{value} dollars",
        f"#### {grouped}",
        f"The answer is {grouped}.",
        f"The answer is ${grouped}.",
        f"\\boxed{{{value}}}",
        f"The final answer is $\\boxed{{{grouped}}}$.",
        f"<reasoning>\nSteps 1 to 3.\n</reasoning>\n<answer>\n{grouped}\n</answer>\n",
        f"She has 3 bags and 12 coins, so {value} in all.",
        f"The answer is {value} (from step 3).",  # an aside after the stated answer: not its last number, 3
        f"The final answer is {value} (7 boxes x $2).",
        f"Answer: {value} apples in 2 baskets",
        f"\u2212{-value}" if value < 0 else f"+{value}",
    ]


def wrong_forms(value: int) -> list[str]:
    """Completions whose answer is not `value`, though they share its digits."""
    return [
        str(value + 1),
        f"{value}0",
        f"1{value}",
        f"{value / 10:g}" if value % 10 else f"{value // 10}.5",
        f"{value}.5",
        f"The answer is {value - 1}.",
        f"{value // 10000},{value % 10000:04d}" if value >= 10000 else f"1,{value:04d}",  # "1,0000" is no 10000
        str(-value) if value else "1",
    ]


def test_every_gsm8k_reference_scores_as_right_in_the_forms_models_write(gsm8k_solutions):
    completions, answers = [], []
    for solution in gsm8k_solutions:
        value = int(solution.rsplit("####", 1)[1].strip().replace(",", ""))
        for form in right_forms(value):
            completions.append(form)
            answers.append(solution)
    scores = call(correctness, completions, answers)
    missed = [(c, a.rsplit("####", 1)[1].strip()) for c, a, s in zip(completions, answers, scores) if s != 2.0]
    assert not missed, f"{len(missed)} of {len(scores)} right answers scored wrong, e.g. {missed[:5]}"


def test_near_misses_of_every_gsm8k_reference_score_as_wrong(gsm8k_solutions):
    completions, answers = [], []
    for solution in gsm8k_solutions:
        value = int(solution.rsplit("####", 1)[1].strip().replace(",", ""))
        for form in wrong_forms(value):
            completions.append(f"<answer>{form}</answer>")
            answers.append(solution)
    scores = call(correctness, completions, answers)
    passed = [(c, a.rsplit("####", 1)[1].strip()) for c, a, s in zip(completions, answers, scores) if s != 0.0]
    assert not passed, f"{len(passed)} of {len(scores)} wrong answers scored right, e.g. {passed[:5]}"


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("She ate 3/4 of the cake.", "0.75", 2.0),  # was its denominator, 4
        ("The probability is \\frac{3}{4}.", "0.75", 2.0),
        ("So x = -3/4", "-0.75", 2.0),
        ("3/4", "0.75", 2.0),
        ("Each gets 2/2", "2", 0.0),  # 1, not its last digit 2
        ("The sale ends on 12/25/2024", "2024", 2.0),  # a date is no fraction: its last number counts
        ("12/4 = 3", "3", 2.0),
    ],
)
def test_a_fraction_that_ends_the_text_counts_whole(completion, answer, reward):
    assert call(correctness, [completion], [answer]) == [reward]


@pytest.mark.parametrize(
    ("completion", "answer"), [("1 000", "1000"), ("3 1/2", "3.5"), ("2,5", "2.5"), ("-1 234 567", "-1234567")]
)
def test_a_completion_that_is_one_number_counts_whole(completion, answer):
    assert extract_answer(completion) == completion
    assert call(correctness, [completion], [answer]) == [2.0]


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The final answer is 18 (9 eggs x $2).", "18"),  # was the aside's last number, 2
        ("The answer is 18 dollars (she sells 9 eggs at $2 each).", "18"),
        ("Therefore, the answer is 42 apples in 3 baskets.", "42"),
        ("The answer is 42 in total after 2 days", "42"),
        ("The answer is 42 because 6*7=42 and 3 more", "42"),
        ("The answer is 3 times 4, which is 12", "12"),  # "3 times" is a working, not a stated number
        ("The answer is 3 + 4 = 7 (so 7)", "7"),
    ],
)
def test_a_stated_answer_before_an_aside_counts(completion, answer):
    assert call(correctness, [completion], [answer]) == [2.0]


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("10000000000000001", "10000000000000000", False),  # both 1e16 as floats
        ("12345678901234567", "12345678901234568", False),
        ("1,000,000,000,000,000,001", "1000000000000000000", False),
        ("$1,000,000,000,000,000,000", "1000000000000000000", True),
        ("12345678901234567 dollars", "12345678901234567", True),
        ("\u221210000000000000001", "-10000000000000001", True),
        ("10000000000000001.0", "10000000000000001", True),
        ("1e16", "10000000000000000", True),
    ],
)
def test_whole_numbers_past_float_precision_compare_digit_for_digit(pred, ref, match):
    assert answers_match(pred, ref) is match
    assert call(correctness, [f"<answer>{pred}</answer>", f"The answer is {pred}."], [ref, ref]) == [2.0 * match] * 2


ODD_COMPLETIONS = [
    "",
    "   \n\t",
    "\u00a0",
    "<answer>",
    "<reasoning>\nunterminated",
    "<reasoning>\nx\n</reasoning>\n<answer>\n42",
    "\\boxed{",
    "####",
    "The answer is",
    "\u7b54\u6848\u662f \u0664\u0662\u3002",  # Chinese text, Arabic-Indic digits, ideographic full stop
    "\U0001f642" * 1000,
    "9" * 5000,
    "1e999 nan inf -inf",
    "1,0000,00000/0",
    "\\frac{1}{0}",
    "<think>" * 500 + "</think>" * 500,
]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_builtin_scores_odd_text_with_a_finite_float(name):
    kwargs = {"max_completion_length": 64} if name == "length_penalty" else {}
    scores = REWARDS[name]([""] * len(ODD_COMPLETIONS), ODD_COMPLETIONS, ["42"] * len(ODD_COMPLETIONS), **kwargs)
    assert len(scores) == len(ODD_COMPLETIONS)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores), list(zip(ODD_COMPLETIONS, scores))


def test_proximity_reads_a_fraction_ending_the_text():
    assert call(proximity, ["She ate 3/4 of the cake."], ["0.75"]) == [1.0]
