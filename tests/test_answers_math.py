"""Competition-style answers (MATH-500, AIME, AMC): LaTeX forms of one value, radicals and pi, choice letters,
tuples, intervals and sets, brace-less and repeated \\boxed, reasoning blocks; and the forms that must stay wrong."""

from __future__ import annotations

import time

import pytest

from minigrpo.answers import answer_number, answers_match, evaluate, extract_answer, reference_answer, to_number
from minigrpo.reward_fns import correctness, int_answer, strict_format, xml_count


def call(fn, completions, answers):
    return fn([""] * len(completions), completions, answers)


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("\\frac{1}{2}\\text{ cup}", "0.5"),  # a unit after a fraction (was two numbers: no answer)
        ("2\\tfrac12", "2.5"),  # a mixed number with a brace-less fraction
        ("\\frac{9}{4}", "2\\frac14"),
        ("\\mathbf{5}", "5"),
        ("1\\;000", "1000"),
        ("2^{10}", "1024"),  # arithmetic on numbers is its value
        ("\\sqrt[3]{8}", "2"),
        ("\\sqrt{2}", "\\sqrt2"),  # brace-less arguments
        ("\\frac{\\pi}{2}", "\\frac\\pi2"),
        ("2\\sqrt{3}", "2 \\sqrt{3}"),  # spacing
        ("2\\pi", "2 \\pi"),
        ("2\\sqrt{3}", "\\sqrt{12}"),  # the same value of radicals and pi
        ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}"),
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}"),
        ("\\pi/2", "\\dfrac{\\pi}{2}"),
        ("x = \\frac{\\pi}{3}", "\\frac{\\pi}{3}"),  # a name before the answer
        ("\\text{Monday}", "Monday"),
        ("\\textbf{Monday}", "monday"),
    ],
)
def test_latex_forms_of_one_value_match(pred, ref):
    assert answers_match(pred, ref) and answers_match(ref, pred)
    assert call(correctness, [f"So the answer is $\\boxed{{{pred}}}$."], [ref]) == [2.0]


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("1/2", "2"),
        ("0.33", "\\frac13"),  # a rounded value is not the fraction
        ("0.333333", "1/3"),
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("-\\frac12", "\\frac12"),
        ("\\frac{-1}{2}", "0.5"),
        ("\\sqrt{2}", "1.414"),
        ("\\pi", "3.14"),
        ("3.14159", "\\pi"),
        ("5\\sqrt{2}", "5"),
        ("\\sqrt[3]{8}", "3"),
        ("2^{10}", "1000"),
        ("2x", "2"),  # a variable times 2 (was read as 2 with a unit)
        ("3n", "3"),
        ("2i", "2"),
        ("034", "33"),
        ("1{,}001", "1000"),
        ("\\infty", "-\\infty"),
        ("x > 5", "5"),
        ("x^2 = 4", "4"),
    ],
)
def test_forms_that_must_stay_wrong(pred, ref):
    assert not answers_match(pred, ref) and not answers_match(ref, pred)
    assert call(correctness, [f"\\boxed{{{pred}}}"], [ref]) == [0.0]


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("(B)", "B", True),
        ("B", "(B)", True),
        ("\\text{(B)}", "B", True),
        ("\\textbf{(B)}", "B", True),
        ("\\textbf{(C)}\\ 12", "C", True),  # AMC solutions give the letter and its value
        ("\\text{(C)} 12", "(C)", True),
        ("(A)", "B", False),
        ("\\textbf{(C)}", "B", False),
        ("12", "C", False),
    ],
)
def test_multiple_choice_letters(pred, ref, match):
    assert answers_match(pred, ref) is match
    assert call(correctness, [f"The answer is $\\boxed{{{pred}}}$"], [ref]) == [2.0 * match]


MATH_SOLUTION = r"Its height is $\frac{\sqrt{3}}{2}$, so the area is $\boxed{\frac{\sqrt{3}}{4}}$."


def test_a_full_math_solution_as_the_reference_is_its_last_box():
    """MATH-style datasets give the worked solution (answer_field: solution): the reference is its last
    \\boxed{...}, as a GSM8K solution's is what follows its "####"."""
    assert reference_answer(MATH_SOLUTION) == r"\frac{\sqrt{3}}{4}"
    assert answers_match(r"\frac{\sqrt3}{4}", MATH_SOLUTION) and answers_match("0.4330127018922193", MATH_SOLUTION)
    assert not answers_match(r"\frac{\sqrt{3}}{2}", MATH_SOLUTION)
    assert answers_match("(1,2)", r"The point is $\boxed{(1, 2)}$.") and reference_answer("18") == "18"
    assert correctness([""], [r"... so \boxed{\dfrac{\sqrt{3}}{4}}"], [MATH_SOLUTION]) == [2.0]


def test_a_stated_choice_letter_is_the_answer():
    assert extract_answer("Checking each option, the answer is (B).") == "(B)"
    assert extract_answer("So the answer is \\textbf{(C)}") == "\\textbf{(C)}"
    completions = ["Hence the answer is (B).", "Hence the answer is (D).", "the answer is \\textbf{(B)}\\ 7"]
    assert call(correctness, completions, ["B"] * 3) == [2.0, 0.0, 2.0]


@pytest.mark.parametrize(
    ("pred", "ref", "match"),
    [
        ("(0, 1]", "(0,1]", True),  # intervals: same brackets, items in order
        ("\\left[0, \\frac{1}{2}\\right)", "[0,0.5)", True),
        ("x \\in (-\\infty, 2)", "(-\\infty,2)", True),
        ("(0, 1]", "[0,1]", False),
        ("(0, 1]", "(0, 1)", False),
        ("(-\\infty, 2)", "(-\\infty, 2]", False),
        ("(1, -2)", "(1,-2)", True),  # tuples: in order
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\dfrac\\pi2)", True),
        ("(\\frac12, 1)", "(0.5, 1)", True),
        ("(1, 2)", "(2, 1)", False),
        ("(1, 2)", "(1, 2, 3)", False),
        ("\\{1, 2\\}", "\\{2,1\\}", True),  # sets: any order
        ("\\left\\{-1, \\frac{1}{2}\\right\\}", "\\{0.5,-1\\}", True),
        ("\\{1, 2\\}", "\\{1,2,3\\}", False),
        ("\\{1, 2\\}", "\\{1, 3\\}", False),
        ("1, 2, 3", "3,2,1", True),  # a bare list of solutions: any order
        ("1, 2", "1, 3", False),
        ("1, 2", "(1, 2)", False),  # a tuple is not a list of solutions
    ],
)
def test_intervals_tuples_and_sets(pred, ref, match):
    assert answers_match(pred, ref) is match
    assert call(correctness, [f"\\boxed{{{pred}}}"], [ref]) == [2.0 * match]


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("So \\boxed 5. Check: 5 + 5 = 10", "5"),  # a brace-less \boxed (was the last number, 10)
        ("So \\boxed -3, and -3 * 2 = -6", "-3"),
        ("Thus \\boxed{7}. (I put the answer in \\boxed as asked, 9 of 10)", "7"),  # a \boxed holding nothing
        ("First \\boxed{3}, then checking: \\boxed{4}", "4"),  # the last \boxed is the answer
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),  # nested braces
        ("<think>maybe <answer>3</answer>? no</think>\nSo the answer is \\boxed{5}.", "5"),  # drafts are no answer
        ("<think>\nthe answer is 3\n</think>\nThe answer is 5.", "5"),
    ],
)
def test_the_answer_a_math_completion_gives(completion, answer):
    assert call(correctness, [completion], [answer]) == [2.0]


def test_a_reasoning_block_without_text_after_it_is_still_read():
    assert extract_answer("<think>so it is \\boxed{12}</think>\n") == "12"
    assert extract_answer("<think>still thinking about 12") == "12"  # cut off inside the reasoning


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("30^\\circ", 30.0),
        ("30^{\\circ}", 30.0),
        ("30\u00b0", 30.0),
        ("033", 33.0),  # AIME answers are written with leading zeros
        ("1{,}000", 1000.0),
        ("1\\,000", 1000.0),
        ("-\\dfrac{3}{4}", -0.75),
        ("\\frac{-3}{4}", -0.75),
        ("\\tfrac{1}{2}", 0.5),
        ("\\text{ 12 }", 12.0),
        ("2\\tfrac12", 2.5),
    ],
)
def test_numbers_in_competition_notation(text, value):
    assert to_number(text) == value
    assert call(correctness, [f"\\boxed{{{text}}}"], [str(value)]) == [2.0]


def test_int_answer_reads_aime_and_latex_integers():
    completions = ["\\boxed{033}", "\\boxed{\\text{12}}", "\\boxed{\\frac{1}{2}}", "\\boxed{2x}", "\\boxed 7"]
    assert call(int_answer, completions, [""] * 5) == [0.5, 0.5, 0.0, 0.0, 0.5]


def test_evaluate_refuses_what_is_no_arithmetic():
    assert evaluate("\\frac{\\sqrt{3}}{2}") == pytest.approx(3**0.5 / 2, rel=1e-15)
    assert evaluate("2\\pi") == pytest.approx(6.283185307179586, rel=1e-15)
    for text in ("x+1", "\\log8", "2^{10000}", "\\sqrt{-4}", "(-8)^{1/3}", "1/0", "3=3", "2 1", "(((1", "e"):
        assert evaluate(text) is None, text
    assert answer_number("\\frac{1}{2} cups") == 0.5 and answer_number("2x") is None


def test_deeply_nested_latex_is_scored_fast():
    nested = "<answer>" + "\\text{" * 20000 + "5" + "}" * 20000 + "</answer>"  # never one regex pass per level
    roots = "<answer>" + "\\sqrt{" * 20000 + "</answer>"
    start = time.perf_counter()
    assert call(correctness, [nested, roots], ["5", "2"]) == [2.0, 0.0]
    assert time.perf_counter() - start < 2.0


def test_a_thousand_math_completions_score_in_well_under_a_second():
    forms = ["\\boxed{\\dfrac{\\pi}{4}}", "\\boxed{(0, 1]}", "\\boxed{2\\sqrt{3}}", "\\boxed{\\textbf{(B)}\\ 12}", "42"]
    refs = ["\\frac{\\pi}{4}", "(0,1]", "\\sqrt{12}", "B", "42"]
    completions = [("Step by step, 3 + 4 = 7. " * 20) + forms[i % 5] for i in range(1000)]
    start = time.perf_counter()
    assert call(correctness, completions, [refs[i % 5] for i in range(1000)]) == [2.0] * 1000
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<reasoning>\r\nr\r\n</reasoning>\r\n<answer>\r\n5\r\n</answer>\r\n",  # Windows line ends (was 0.0 / 0.125)
        "<reasoning>\nr\r\n</reasoning>\n<answer>\r\n5\n</answer>",
    ],
)
def test_format_rewards_read_windows_line_ends(completion):
    assert call(strict_format, [completion], ["5"]) == [0.5]
    assert call(xml_count, [completion], ["5"]) == [0.5]


@pytest.mark.parametrize(
    ("completion", "strict", "count"),
    [
        ("<think>\nr\n</think>\n<answer>\n5\n</answer>\n", 0.0, 0.25),  # another reasoning tag: not the format
        ("<reasoning>\nr\n</reasoning>\n<answer>\n3\n</answer>\n<answer>\n5\n</answer>\n", 0.0, 0.25),  # two answers
        ("<reasoning>\nr\n</reasoning>\n\n<answer>\n5\n</answer>\n", 0.0, 0.5),  # a blank line between the blocks
        ("\n<reasoning>\nr\n</reasoning>\n<answer>\n5\n</answer>\n", 0.0, 0.5),  # something before
    ],
)
def test_format_rewards_on_unusual_layouts(completion, strict, count):
    assert call(strict_format, [completion], ["5"]) == [strict]
    assert call(xml_count, [completion], ["5"]) == [count]
