"""Built-in rewards on completions the other reward tests leave out: a second think tag after the answer, long
blank runs, answers cut inside their closing tag, answers that are arithmetic, dotted thousands."""

from __future__ import annotations

import time

import numpy as np
import pytest

from minigrpo.answers import extract_answer, to_number
from minigrpo.reward_fns import correctness, int_answer, length_penalty, proximity, think_format
from minigrpo.rewards import RewardError, RewardSpec, score


def call(fn, completions, answers=None):
    n = len(completions)
    return fn([""] * n, completions, answers if answers is not None else ["5"] * n)


@pytest.mark.parametrize(
    "completion",
    [
        "<think>7 * 9 = 63</think> The answer is 63 </think>",  # closed twice
        "<think>7 * 9 = 63</think> The answer is 63 <think>",  # a second block opened, then cut off
        "7 * 9 = 63</think>\n63\n<think>",  # the prompt opened the first block
    ],
)
def test_think_format_refuses_a_second_think_tag_after_the_answer(completion):
    assert call(think_format, [completion]) == [0.0]


@pytest.mark.parametrize(
    "completion",
    [" " * 100_000, "\n" * 100_000 + "63", "<think>a</think>" + "b" * 100_000 + "<think><think>"],
    ids=["blank", "newlines_then_answer", "long_answer_then_tags"],
)
def test_think_format_takes_linear_time_on_100kb(completion):
    start = time.perf_counter()
    assert call(think_format, [completion]) == [0.0]
    assert time.perf_counter() - start < 0.5


def test_think_format_still_takes_leading_space_and_the_prompts_opening_tag():
    completions = ["\n\n<think>a</think>\n63", "  a</think> 63", "<think>a</think>  \n", "<think>a</think>\n\\boxed{6}"]
    assert call(think_format, completions) == [0.5, 0.5, 0.0, 0.5]


@pytest.mark.parametrize(
    ("answer", "reference"),
    [("2^{10}", "1024"), ("10^3", "1000"), ("\\frac{1}{-2}", "-0.5"), ("0.1+0.2", "0.3"), ("2\\sqrt{3}", "\\sqrt{12}")],
)
def test_proximity_reads_an_arithmetic_answer_as_correctness_does(answer, reference):
    completion = f"<answer>{answer}</answer>"
    assert call(correctness, [completion], [reference]) == [2.0]
    assert call(proximity, [completion], [reference]) == [pytest.approx(1.0, abs=1e-9)]  # was -1.0 or None


def test_proximity_of_an_arithmetic_answer_off_by_ten_percent():
    assert call(proximity, ["<answer>2^{10}</answer>"], ["\\frac{1024}{1.1}"]) == [pytest.approx(0.0, abs=1e-9)]


def test_int_answer_takes_a_power_with_a_whole_value():
    completions = ["<answer>2^{10}</answer>", "<answer>2^{-1}</answer>", "\\boxed{\\frac{6}{-3}}"]
    assert call(int_answer, completions) == [0.5, 0.0, 0.5]


@pytest.mark.parametrize("cut", ["</answer", "</ans", "</", "<"])
def test_answer_cut_inside_its_closing_tag_is_read_without_the_tag(cut):
    completion = f"<reasoning>\n48 + 24 = 72\n</reasoning>\n<answer>\n72\n{cut}"
    assert extract_answer(completion) == "72"
    assert call(correctness, [completion], ["72"]) == [2.0]
    assert call(int_answer, [completion]) == [0.5]


@pytest.mark.parametrize(
    ("text", "value"), [("1.000.000", 1e6), ("-2.500.000", -2.5e6), ("$1.234.567", 1234567.0), ("1.000", 1.0)]
)
def test_to_number_reads_thousands_grouped_by_dots(text, value):
    assert to_number(text) == value


def test_correctness_reads_dotted_thousands_in_a_tag_and_as_the_last_number():
    completions = ["<answer>1.000.000</answer>", "Sie verdient 2.500.000 Euro.", "<answer>1.000.000,5</answer>"]
    assert call(correctness, completions, ["1000000", "2500000", "1000000.5"]) == [2.0, 2.0, 2.0]


def test_length_penalty_leaves_a_missing_completion_unscored_with_a_length_column():
    out = length_penalty(["", ""], ["a" * 9, None], ["", ""], completion_lengths=[100, 100], max_completion_length=100)
    assert out == [-1.0, None]


def test_a_wrong_element_type_gives_a_one_line_error_naming_the_reward():
    def nested_arrays(prompts, completions, answers, **_):
        return [[np.zeros((3, 3))] for _ in completions]

    with pytest.raises(RewardError, match="reward 'mine': element 0 is list") as raised:
        score(["p"], ["c"], ["a"], [RewardSpec("mine", fn=nested_arrays, timeout_s=None)])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "completion",
    ["The change is -$5.", "<answer>It is -$5</answer>", "He lost \u2212$5 overall", "<answer>-\\$5 in all</answer>"],
)
def test_a_negative_dollar_amount_keeps_its_sign(completion):
    assert call(correctness, [completion], ["-5"]) == [2.0]
    assert call(correctness, [completion], ["5"]) == [0.0]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_reward_returning_a_1d_array_is_read_as_its_list(kind):
    """numpy arrays and tensors are common returns: a 1-D one is the list it holds, NaN still masked."""
    import torch

    def as_array(prompts, completions, answers, **_):
        values = [1.0, float("nan"), 0.25]
        return np.array(values) if kind == "numpy" else torch.tensor(values)

    res = score([""] * 3, ["a", "b", "c"], [""] * 3, [RewardSpec("arr", fn=as_array, timeout_s=None)])
    assert res.per_fn[:, 0].tolist()[::2] == [1.0, 0.25] and res.per_fn[1, 0].isnan()
    assert res.nones == {"arr": 1}


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_an_async_reward_is_awaited(timeout_s):
    """`async def` rewards (as remote judges are written) scored like plain ones, with or without a timeout
    thread (the coroutine was refused as a wrong type, with a 'never awaited' warning)."""
    import asyncio

    async def judge(prompts, completions, answers, **_):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    res = score([""] * 2, ["ab", "abc"], [""] * 2, [RewardSpec("judge", fn=judge, timeout_s=timeout_s)])
    assert res.per_fn[:, 0].tolist() == [2.0, 3.0] and res.failures == {"judge": 0}


def test_reward_metrics_are_fp64_means_of_the_rows():
    """One process took the mean of the fp32 rows in fp32 (1e7 + x/10: 10000000.0), several ranks in fp64
    over the gathered rows (10000000.1875): the same rows now give the same numbers."""

    def offset(prompts, completions, answers, **_):
        return [1e7 + len(c) / 10 for c in completions]

    res = score([""] * 4, ["a", "bb", "ccc", "dddd"], [""] * 4, [RewardSpec("off", fn=offset, timeout_s=None)])
    rows = res.per_fn[:, 0].double()
    metrics = res.metrics()
    assert metrics["reward/off"] == rows.mean().item() and metrics["reward/off/std"] == rows.std().item()
    assert metrics["reward/total"] == res.total.double().mean().item()


def test_a_reward_that_scored_no_row_has_no_spread_either():
    """reward/<name> is NaN where no row was scored; its std read 0.0 beside it ("all alike")."""

    def nothing(prompts, completions, answers, **_):
        return [None] * len(completions)

    def one(prompts, completions, answers, **_):
        return [1.0] + [None] * (len(completions) - 1)

    specs = [RewardSpec("nothing", fn=nothing, timeout_s=None), RewardSpec("one", fn=one, timeout_s=None)]
    metrics = score([""] * 3, ["a", "b", "c"], [""] * 3, specs).metrics()
    assert np.isnan(metrics["reward/nothing"]) and np.isnan(metrics["reward/nothing/std"])
    assert (metrics["reward/one"], metrics["reward/one/std"], metrics["reward/total_std"]) == (1.0, 0.0, 0.0)
