"""Answer edges: the first number exact_answer reads (fractions, mixed numbers, percents it starts, drafts in a
reasoning block), whole numbers past a float's precision compared digit for digit in every form they are written
in, exact arithmetic, the unicode minus in arithmetic, mixed numbers as the last number, and linear time."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from minigrpo.answer_arithmetic import evaluate, exact_value
from minigrpo.answers import answers_match, extract_answer
from minigrpo.reward_fns import REWARDS, correctness, exact_answer


def call(fn, completions, answers, **columns):
    return fn([""] * len(completions), completions, answers, **columns)


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("3/4", "0.75", 1.0),  # was read as its first number, 3
        ("-3/4", "-0.75", 1.0),
        ("\u22123/4 of a cup", "-0.75", 1.0),
        ("3/4 of the cake", "3/4", 1.0),
        ("3 / 4 is left", "0.75", 1.0),
        ("1 1/2", "1.5", 1.0),
        ("1 1/2 cups, because 3/2 = 1 1/2", "1.5", 1.0),
        ("\\frac{3}{4} of it", "0.75", 1.0),
        ("-\\dfrac34", "-0.75", 1.0),
        ("2\\frac{1}{2} cups", "2.5", 1.0),
        ("1.5 \\times 10^3 m", "1500", 1.0),
        ("50% of them", "0.5", 1.0),
        ("50 percent", "0.5", 1.0),
        (".5", "0.5", 1.0),
        ("1,234 apples", "1234", 1.0),
        ("$1,000.50 in all", "1000.5", 1.0),
        # first-number reading kept: the answer comes first, the working after
        ("7. Because 3 + 4 = 7", "7", 1.0),
        ("7. Because 3 + 4 = 8", "8", 0.0),
        ("12/25/2024 is the date", "12", 1.0),  # a date is no fraction
        ("12 5/4 is no mixed number", "12", 1.0),
        ("7\n1/2 of it is gone", "7", 1.0),  # a line break ends the number
        ("2.5/5", "2.5", 1.0),  # only a whole number starts a fraction
    ],
)
def test_exact_answer_reads_the_first_number_whole(completion, answer, reward):
    assert call(exact_answer, [completion], [answer]) == [reward]


def test_exact_answer_reads_past_a_closed_reasoning_block():
    completions = ["<think>maybe 41</think>42", "<think>41? no, 42</think> 42 it is", "<think>41</think>", "41"]
    assert call(exact_answer, completions, ["42", "42", "41", "41"]) == [1.0, 1.0, 1.0, 1.0]
    assert call(exact_answer, ["<think>42</think> 41"], ["42"]) == [0.0]  # the draft is no answer


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("12345678901234567891", "12345678901234567890", False),
        ("-12345678901234567891", "-12345678901234567890", False),
        ("\u221212345678901234567891", "-12345678901234567891", True),
        ("1e20", "100000000000000000000", True),
        ("1e20", "100000000000000000001", False),
        ("2^{64}", "18446744073709551616", True),
        ("2^{64}", "18446744073709551615", False),  # was equal: a power was compared as floats
        ("2**64", "18446744073709551616", True),  # "**" is a power (was no value at all)
        ("2**64", "18446744073709551617", False),
        ("-2^{64}", "-18446744073709551616", True),
        ("\\frac{12345678901234567891}{1}", "12345678901234567890", False),
        ("12345678901234567891/1", "12345678901234567890", False),
        ("24691357802469135782/2", "12345678901234567891", True),
        ("12345678901234567890 + 1", "12345678901234567891", True),
        ("12345678901234567890 + 1", "12345678901234567890", False),
        ("1.5 \\times 10^{20}", "150000000000000000000", True),
        ("1.5 \\times 10^{20}", "150000000000000000001", False),
        ("12 345 678 901 234 567 891", "12345678901234567891", True),
        ("12 345 678 901 234 567 891", "12345678901234567890", False),  # a whole answer with spaces
        ("1{,}000{,}000{,}000{,}000{,}000{,}001", "1000000000000000001", True),
        ("1{,}000{,}000{,}000{,}000{,}000{,}001", "1000000000000000000", False),
        ("$12,345,678,901,234,567,891", "12345678901234567891", True),
        ("12345678901234567890 dollars", "12345678901234567891", False),
        ("\\sqrt{100000000000000000000000000000000000000}", "10000000000000000000", True),
        ("\\sqrt{100000000000000000000000000000000000000}", "10000000000000000001", False),
        ("1.000.000.000.000.000.001", "1000000000000000001", True),
        # values that are not whole keep the tolerance of float rounding (rel 1e-9)
        ("0.1000000000000000000001", "0.1", True),
        ("1/3", "0.3333333333333333333333", True),
    ],
)
def test_whole_numbers_past_a_float_compare_digit_for_digit(pred, ref, match):
    assert answers_match(pred, ref) is match


def test_arithmetic_is_exact_while_it_can_be():
    assert exact_value("2^{64}+1") == 2**64 + 1 and isinstance(exact_value("2^{64}"), Fraction)
    assert exact_value("\\sqrt{\\frac{9}{4}}") == Fraction(3, 2) and isinstance(exact_value("\\sqrt{2}"), float)
    assert evaluate("0.1+0.2") == 0.3 and evaluate("2\\pi") == pytest.approx(6.283185307179586, abs=0)
    assert exact_value("2^{-1}") == Fraction(1, 2) and exact_value("0^{-1}") is None
    start = time.perf_counter()
    assert exact_value("9^{9^{9}}") is None and exact_value("2^{9999}") is None  # past a float: no value
    assert exact_value("10^{1000}/10^{999}") == 10
    assert time.perf_counter() - start < 0.5


def test_two_numbers_side_by_side_are_no_product():
    assert exact_value("1.2.3") is None  # was 1.2 * 0.3
    assert not answers_match("1.2.3", "0.36") and answers_match("1.2.3", "1.2.3")


@pytest.mark.parametrize(
    ("pred", "ref"), [("\u22122^{10}", "-1024"), ("2^{\u22121}", "0.5"), ("\u2212\\sqrt{2}", "-\\sqrt{2}")]
)
def test_the_unicode_minus_is_a_minus_in_arithmetic(pred, ref):
    assert answers_match(pred, ref)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("She ate 2 1/2 pies", "2 1/2"),  # was its fraction alone, "1/2"
        ("so it is -3 1/4 degrees", "-3 1/4"),
        ("We need 2\\frac{1}{2} cups", "2\\frac{1}{2}"),
        ("She ate 2 3/2 pies", "3/2"),  # no mixed number: the fraction is not proper
        ("It was 1.5 1/2", "1/2"),
        ("On 12/25/2024", "2024"),
    ],
)
def test_a_mixed_number_at_the_end_is_read_whole(completion, answer):
    assert extract_answer(completion) == answer


def test_a_mixed_number_at_the_end_is_scored_right():
    assert call(correctness, ["She ate 2 1/2 pies", "She ate 2 1/2 pies"], ["2.5", "0.5"]) == [2.0, 0.0]


@pytest.mark.parametrize(
    "text",
    ["1 " + "1" * 100_000 + "/", "1/" * 50_000, "\\frac{" * 16_000, "1 \\times 10^" * 8_000, "-1" * 50_000],
    ids=["long_mixed", "slashes", "open_fracs", "powers_of_ten", "signs"],
)
def test_adversarial_100kb_completion_is_scored_in_linear_time(text):
    start = time.perf_counter()
    for name, fn in REWARDS.items():
        columns = {"max_completion_length": [10**6] * 2} if name == "length_penalty" else {}
        call(fn, [text, f"<answer>{text}</answer>"], ["5", "12345678901234567891"], **columns)
    assert time.perf_counter() - start < 3.0
