"""Built-in rewards on hand-written completions; name resolution; safe scoring (failures, timeouts, errors)."""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minigrpo import config
from minigrpo.errors import UserError
from minigrpo.rewards import (
    GSM8K_SUITE,
    REWARDS,
    RewardError,
    RewardSpec,
    build_reward_specs,
    correctness,
    exact_answer,
    extract_answer,
    int_answer,
    length_penalty,
    make_length_penalty,
    proximity,
    resolve_reward,
    score,
    soft_format,
    strict_format,
    think_format,
    to_number,
    xml_count,
)

ROOT = Path(__file__).resolve().parents[1]
HELPERS = "tests.helpers.reward_fns"
GOOD = "<reasoning>\nNatalia sold 48 / 2 = 24 clips in May.\n48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"
GSM8K_REF = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


@pytest.fixture(autouse=True)
def _repo_root_on_path(monkeypatch):
    """Makes tests.helpers.reward_fns importable whatever pytest's import mode put on sys.path."""
    monkeypatch.syspath_prepend(str(ROOT))


def call(fn, completions, answers=None, **columns):
    n = len(completions)
    return fn([""] * n, completions, answers if answers is not None else [""] * n, **columns)


# ----------------------------------------------------------------------------- parsing


def test_extract_answer_priority():
    assert extract_answer("<answer>5</answer> then \\boxed{6} #### 7 8") == "5"
    assert extract_answer("<answer>1</answer><answer> 2 </answer>") == "2"
    assert extract_answer("cut off <answer>\n41") == "41"
    assert extract_answer("so \\boxed{\\frac{1}{2}} #### 7") == "\\frac{1}{2}"
    assert extract_answer("72 clips\n#### 72\nextra") == "72"
    assert extract_answer("3 apples and 15 pears: 18 fruits") == "18"
    assert extract_answer("3 apples and 15 pears: 18 fruits", last_number=False) is None
    assert extract_answer("no number here") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("18", 18.0),
        ("18.0", 18.0),
        ("18.", 18.0),
        ("$5", 5.0),
        ("\\$5.50", 5.5),
        ("1,234", 1234.0),
        ("1{,}234,567", 1234567.0),
        ("-3", -3.0),
        ("50%", 50.0),
        ("3/4", 0.75),
        ("-\\frac{1}{4}", -0.25),
        ("\\boxed{42}", 42.0),
        ("\\frac12", 0.5),  # LaTeX's single-digit arguments
        ("\\dfrac{3}4", 0.75),
        ("- 3", -3.0),  # a space after the sign
        ("2.5e3", 2500.0),
        ("1E-2", 0.01),
        ("1e999", None),  # not finite
        ("\\frac{1}{0}", None),
        ("1,23", 1.23),  # a comma with 2 digits after it can only be a decimal mark
        ("1,2,3", None),
        ("18 dollars", None),
        ("", None),
    ],
)
def test_to_number(text, value):
    assert to_number(text) == value


# ----------------------------------------------------------------------------- built-ins


def test_correctness():
    completions = [
        GOOD,
        "<reasoning>\n...\n</reasoning>\n<answer>\n72.0\n</answer>",
        "The total is \\boxed{1,234}.",
        "48 + 24 = 72\n#### 72",
        "<answer>$72</answer>",
        "<answer>The answer is 72.</answer>",
        "48 + 24 makes 72",  # last number
        "<answer>71</answer> wait, 72",  # the tag wins
        "I think it is 71",
        "no idea",
    ]
    answers = [GSM8K_REF, "72", "1234", "72", "72", "72", "72", "72", "72", "72"]
    assert call(correctness, completions, answers) == [2.0] * 7 + [0.0] * 3
    assert call(correctness, ["<answer>1080</answer>", "<answer>1,080</answer>"], ["1,080", "1080"]) == [2.0, 2.0]
    assert call(correctness, ["72"], [None]) == [None]  # no reference: masked
    assert call(correctness, ["<answer>Paris</answer>"], ["paris"]) == [2.0]  # non-numeric: text


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("<answer>\u22125</answer>", "-5", 2.0),  # unicode minus
        ("<answer>\u22125</answer>", "5", 0.0),
        ("So x = \u22127", "-7", 2.0),  # last number
        ("The shift is 9-5", "5", 2.0),  # a hyphen after a digit is no minus sign
        ("Total: 3 - 5 = -2", "-2", 2.0),
        ("The rate is 2.5e-3.", "0.0025", 2.0),  # last number, with its exponent
        ("3e5x then 7", "7", 2.0),  # "3e5x" holds no exponent
        ("<answer>- 4</answer>", "-4", 2.0),
    ],
)
def test_correctness_reads_signs(completion, answer, reward):
    assert call(correctness, [completion], [answer]) == [reward]


@pytest.mark.parametrize(
    "answer", ["1" * 400 + "/3", "1" * 5000 + "/3", "\\frac{" + "1" * 400 + "}{3}"], ids=["a/b", "4300+_digits", "frac"]
)
def test_runaway_digits_score_zero_instead_of_raising(answer):
    completion = f"<answer>{answer}</answer>"
    assert [call(fn, [completion], ["5"])[0] for fn in (correctness, int_answer, exact_answer)] == [0.0, 0.0, 0.0]
    assert call(proximity, [completion], ["5"]) == [-1.0]


@pytest.mark.parametrize(
    "text",
    ["<answer>" * 12_500, "<reasoning></reasoning>" * 4_350, "<think>" + "a" * 100_000],
    ids=["unclosed_answers", "reasoning_pairs", "unclosed_think"],
)
def test_adversarial_100kb_completion_is_scored_in_linear_time(text):
    start = time.perf_counter()
    for fn in (correctness, int_answer, soft_format, strict_format, think_format, xml_count, proximity, exact_answer):
        call(fn, [text], ["5"])
    assert time.perf_counter() - start < 2.0


def test_int_answer():
    completions = [GOOD, "<answer>2.5</answer>", "<answer>18.0</answer>", "\\boxed{-3}", "<answer>x</answer>", "72"]
    assert call(int_answer, completions) == [0.5, 0.0, 0.5, 0.5, 0.0, 0.0]  # unmarked "72" gets nothing


def test_strict_format():
    completions = [
        GOOD,
        GOOD.rstrip("\n"),  # generation stopped at EOS before the final newline
        "<reasoning>one line</reasoning>\n<answer>\n72\n</answer>\n",  # tags not on their own lines
        "Sure! " + GOOD,
        GOOD + "more",
        GOOD.rstrip("\n") + "\n<answer>\n73\n</answer>\n",  # two answer blocks
    ]
    assert call(strict_format, completions) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_think_format():
    completions = [
        "<think>\n7 * 9 = 63\n</think>\n\nThe answer is \\boxed{63}.",
        "7 * 9 = 63\n</think>\n<answer>63</answer>",  # the template's generation prompt opened the block
        "<think>7 * 9 = 63</think>",  # no answer after the reasoning
        "<think>a</think> 63 <think>b</think> 64",  # a second block
        "<think>still thinking",  # cut off inside the reasoning
        "63",
    ]
    assert call(think_format, completions) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_soft_format():
    completions = [GOOD, "Sure! <reasoning>a</reasoning> <answer>b</answer> bye", "<answer>72</answer>", "<reasoning>a"]
    assert call(soft_format, completions) == [0.5, 0.5, 0.0, 0.0]


def test_xml_count():
    assert call(xml_count, [GOOD]) == [0.5]
    assert call(xml_count, [GOOD + "x y z"]) == [pytest.approx(0.5 - 0.003)]  # spaces are free
    assert call(xml_count, [GOOD + "z" * 2000]) == [0.0]  # the penalty is capped at 0.5
    assert call(xml_count, ["<answer>\n72\n</answer>"]) == [0.125]  # only "\n</answer>" is in place
    assert call(xml_count, ["<reasoning>\n<reasoning>\n" + GOOD[12:]]) == [0.375]  # a tag twice earns nothing
    assert call(xml_count, ["plain text"]) == [0.0]


def test_proximity():
    completions = ["<answer>100</answer>", "<answer>110</answer>", "<answer>80</answer>", "<answer>105</answer>"]
    out = call(proximity, [*completions, "no idea", "<answer>100000</answer>"], ["100"] * 6)
    # e = |pred - ref| / 100: 0 -> 1; 0.1 -> 0; 0.2 -> 2 * 0.25 - 1; 0.05 -> 2 * 2**-0.5 - 1; far off -> -1
    assert out == pytest.approx([1.0, 0.0, -0.5, 2 * 2**-0.5 - 1, -1.0, -1.0])
    out = call(proximity, ["<answer>0.05</answer>", "<answer>1</answer>"], ["0", "abc"])
    assert out == pytest.approx([2 * 2**-0.5 - 1, None])  # |ref| < 1 -> absolute error; non-numeric ref masked


def test_length_penalty():
    fn = make_length_penalty(max_length=100, buffer=20)
    out = call(fn, ["x"] * 5, completion_lengths=[50, 80, 90, 100, 130])
    assert out == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert call(make_length_penalty(100, 20, factor=0.5), ["x"], completion_lengths=[90]) == [-0.25]
    # built-in: characters when completion_lengths is absent; L_max from the column, L_buf = L_max // 5 = 2
    out = call(length_penalty, ["a" * 8, "a" * 9, "a" * 10], max_completion_length=[10] * 3)
    assert out == pytest.approx([0.0, -0.5, -1.0])
    with pytest.raises(RewardError, match="max_completion_length"):
        call(length_penalty, ["a"])


def test_exact_answer():
    completions = ["42", "The answer is 42, not 43", "43 is wrong, 42 is right", "<answer>42</answer> 7", "4.0", "-5"]
    answers = ["42", "42", "42", "42", "4", "-5"]
    assert call(exact_answer, completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert call(exact_answer, ["no number", "1"], ["3", None]) == [0.0, None]


def test_every_builtin_returns_one_value_per_completion():
    columns = {"completion_lengths": [10, 20], "max_completion_length": [16, 16]}
    for name, fn in REWARDS.items():
        out = call(fn, [GOOD, "garbage"], ["72", "72"], **columns)
        assert len(out) == 2 and all(v is None or isinstance(v, float) for v in out), name
    assert set(GSM8K_SUITE) <= set(REWARDS)


# ----------------------------------------------------------------------------- resolution


def test_resolve_builtin_and_user_function():
    assert resolve_reward("correctness") is correctness
    fn = resolve_reward(f"{HELPERS}:length_ratio")
    assert fn.__name__ == "length_ratio" and call(fn, ["abcde", ""]) == [0.5, None]
    assert RewardSpec(f"{HELPERS}:length_ratio").fn.__name__ == "length_ratio"


def test_unknown_builtin_suggests_the_closest_name():
    with pytest.raises(RewardError, match="did you mean 'correctness'") as e:
        resolve_reward("corectness")
    assert "strict_format" in str(e.value)  # lists the built-ins


def test_bad_import_paths_name_the_module_or_attribute():
    with pytest.raises(RewardError, match=r"cannot import module 'tests\.helpers\.nope'"):
        resolve_reward("tests.helpers.nope:fn")
    with pytest.raises(RewardError, match="no attribute 'lenght_ratio'; did you mean 'length_ratio'"):
        resolve_reward(f"{HELPERS}:lenght_ratio")
    with pytest.raises(RewardError, match="not a function"):
        resolve_reward(f"{HELPERS}:NOT_CALLABLE")


# ----------------------------------------------------------------------------- safe scoring

COMPLETIONS = [GOOD, "<answer>71</answer>", "bad " + GOOD, "slow"]
ANSWERS = ["72"] * 4


def test_score_combines_weighted_rewards():
    specs = [RewardSpec("correctness", weight=1.0), RewardSpec("xml_count", weight=2.0)]
    res = score([""] * 4, COMPLETIONS, ANSWERS, specs)
    assert res.names == ["correctness", "xml_count"]
    assert res.per_fn.shape == (4, 2) and res.total.shape == (4,)
    xml = call(xml_count, COMPLETIONS)
    expected = [2.0 + 2 * xml[0], 0.0 + 2 * xml[1], 2.0 + 2 * xml[2], 0.0 + 2 * xml[3]]
    assert res.total.tolist() == pytest.approx(expected)
    assert res.failures == {"correctness": 0, "xml_count": 0} and res.timeouts == res.failures
    m = res.metrics()
    assert m["reward/correctness"] == pytest.approx(1.0) and m["reward/masked_rows"] == 0.0


def test_raising_reward_is_masked_and_counted_and_others_still_count():
    specs = [RewardSpec("correctness"), RewardSpec(f"{HELPERS}:always_raises", weight=10.0)]
    res = score([""] * 4, COMPLETIONS, ANSWERS, specs)
    name = f"{HELPERS}:always_raises"
    assert res.per_fn[:, 1].isnan().all()
    assert res.failures[name] == 4 and res.timeouts[name] == 0
    assert "RuntimeError: reward service unavailable" in res.errors[name]
    assert res.total.tolist() == [2.0, 0.0, 2.0, 0.0]  # masked, not scored 0 * 10 or NaN
    alone = score([""] * 4, COMPLETIONS, ANSWERS, [RewardSpec(name)])
    assert alone.total.isnan().all()  # every reward of the row failed
    assert alone.metrics()["reward/masked_rows"] == 4.0


@pytest.mark.parametrize("timeout_s", [None, 5.0], ids=["no_timeout", "timeout"])
def test_reward_calling_sys_exit_is_masked_instead_of_ending_the_run(timeout_s):
    def quits(prompts, completions, answers, **_):
        if any("7" in c for c in completions):
            sys.exit(3)
        return [1.0] * len(completions)

    res = score([""] * 2, ["7", "8"], [""] * 2, [RewardSpec("quits", fn=quits, timeout_s=timeout_s)])
    assert math.isnan(res.per_fn[0, 0].item()) and res.per_fn[1, 0].item() == 1.0
    assert res.failures == {"quits": 1} and res.errors["quits"] == "SystemExit: 3"


def test_reward_raising_on_some_samples_masks_only_those():
    res = score([""] * 4, COMPLETIONS, ANSWERS, [RewardSpec(f"{HELPERS}:raises_on_bad")])
    assert res.per_fn[:, 0].tolist()[:2] == [1.0, 1.0] and res.per_fn[3, 0].item() == 1.0
    assert math.isnan(res.per_fn[2, 0].item())
    assert res.failures == {f"{HELPERS}:raises_on_bad": 1}


class Gate:
    """A reward function (0.5 per row) whose calls block while any completion contains "slow", until the
    test releases them; it records the batch size of every call and which calls returned."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[int] = []
        self.returned: list[int] = []

    def __call__(self, prompts: list, completions: list[str], answers: list, **_) -> list[float]:
        self.calls.append(len(completions))
        if any("slow" in c for c in completions):
            self.release.wait(60)
        self.returned.append(len(completions))
        return [0.5] * len(completions)


def test_timeout_masks_the_slow_sample_without_waiting_for_it(caplog):
    gate = Gate()
    try:
        res = score(
            [""] * 4, COMPLETIONS, ANSWERS, [RewardSpec("gate", fn=gate, timeout_s=1.0), RewardSpec("correctness")]
        )
        # the batch call timed out, then one call per row: only the slow row's timed out
        assert gate.calls == [4, 1, 1, 1, 1]
        # score returned while the batch call and the slow row's call were still blocked: not waited for
        assert gate.returned == [1, 1, 1] and not gate.release.is_set()
    finally:
        gate.release.set()
    assert res.timeouts["gate"] == 1 and res.failures["gate"] == 0 and res.nones["gate"] == 0
    assert res.per_fn[:3, 0].tolist() == [0.5, 0.5, 0.5] and math.isnan(res.per_fn[3, 0].item())
    assert res.total.tolist() == [2.5, 0.5, 2.5, 0.0]  # the slow row keeps its correctness score
    assert res.metrics()["reward/gate/timeouts"] == 1.0 and res.unscored == []
    # a timeout alone has no error to show (the line ended "first error: None")
    assert [r.getMessage() for r in caplog.records] == ["reward gate: 0 of 4 rows failed, 1 timed out"]


def test_consecutive_timeouts_stop_the_per_sample_fallback():
    gate = Gate()
    try:
        spec = RewardSpec("gate", fn=gate, timeout_s=0.2, max_consecutive_timeouts=2)
        res = score([""] * 8, ["slow"] * 8, ["1"] * 8, [spec])
        assert gate.calls == [8, 1, 1]  # the batch, then two rows; the other six are not tried
        assert gate.returned == []
    finally:
        gate.release.set()
    assert res.timeouts["gate"] == 8 and res.total.isnan().all()
    assert res.unscored == ["gate"]


def test_unscored_names_the_rewards_that_scored_no_row():
    nothing = lambda p, c, a, **_: [None, float("nan"), None]
    some = lambda p, c, a, **_: [None, 1.0, None]
    specs = [
        RewardSpec("correctness"),
        RewardSpec("nothing", fn=nothing),
        RewardSpec(f"{HELPERS}:always_raises"),
        RewardSpec("some", fn=some),
    ]
    res = score([""] * 3, ["<answer>1</answer>", "2", "x"], ["1", "1", "1"], specs)
    assert res.unscored == ["nothing", f"{HELPERS}:always_raises"]
    assert res.total.tolist() == [2.0, 1.0, 0.0]
    empty = score([], [], [], [RewardSpec("nothing", fn=lambda p, c, a, **_: [])])
    assert empty.unscored == []  # an empty batch is no failure of the reward


def test_none_nan_and_bool_values():
    fn = lambda p, c, a, **_: [None, float("nan"), True, False, 3, math.inf]
    res = score([""] * 6, ["x"] * 6, [""] * 6, [RewardSpec("mine", fn=fn)])
    assert res.per_fn[2:5, 0].tolist() == [1.0, 0.0, 3.0]
    assert res.per_fn[[0, 1, 5], 0].isnan().all()
    assert res.nones == {"mine": 3} and res.failures == {"mine": 0}


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0, 2.0], "returned 2 values for 3 completions"),
        ("0.5", "returned str"),
        ({"a": 1.0}, "returned dict"),
        (None, "returned NoneType"),
        (torch.ones(3, 1), "returned Tensor of shape (3, 1); expected a list of 3 floats or None"),
        (torch.ones(2), "returned 2 values for 3 completions"),
        ([1.0, "0.5", 2.0], "element 1 is str"),
        ([1.0, {"x": 1}, 2.0], "element 1 is dict"),
    ],
)
def test_contract_violations_raise_naming_the_function(returned, message):
    def broken(prompts, completions, answers, **_):
        return returned

    with pytest.raises(RewardError, match="broken") as e:
        score([""] * 3, ["a", "b", "c"], [""] * 3, [RewardSpec("broken", fn=broken)])
    assert message in str(e.value)


def test_columns_reach_the_function_also_per_sample():
    name = f"{HELPERS}:uses_column"
    res = score([""] * 3, ["a", "b", "c"], [""] * 3, [RewardSpec(name)], columns={"difficulty": [1, 2, 3]})
    assert res.total.tolist() == [1.0, 2.0, 3.0]

    def picky(prompts, completions, answers, *, difficulty, **_):
        if len(completions) > 1:
            raise RuntimeError("one at a time")
        return [difficulty[0] * 10.0]

    res = score([""] * 3, ["a", "b", "c"], [""] * 3, [RewardSpec("picky", fn=picky)], columns={"difficulty": [1, 2, 3]})
    assert res.total.tolist() == [10.0, 20.0, 30.0] and res.failures == {"picky": 0}
    with pytest.raises(ValueError, match="column 'difficulty'"):
        score([""] * 3, ["a", "b", "c"], [""] * 3, [RewardSpec(name)], columns={"difficulty": [1]})


def test_contract_error_raised_inside_the_function_propagates():
    with pytest.raises(RewardError, match="max_completion_length"):
        score([""] * 2, ["a", "b"], [""] * 2, [RewardSpec("length_penalty")])
    with pytest.raises(ValueError, match="unique"):
        score([""], ["a"], [""], [RewardSpec("correctness"), RewardSpec("correctness")])


# ----------------------------------------------------------------------------- building a run's rewards


def scaled_length(prompts: list, completions: list[str], answers: list, *, scale: float = 1.0, offset: float = 0.0):
    """A user reward with two settings: scale * len(completion) + offset."""
    return [scale * len(c) + offset for c in completions]


def any_setting(prompts: list, completions: list[str], answers: list, **settings):
    """A user reward that takes any keyword (settings and columns alike): bonus + completion length."""
    return [float(settings.get("bonus", 0) + n) for n in settings.get("completion_lengths", [0] * len(completions))]


def cfg_specs(*entries: tuple) -> list[config.RewardSpec]:
    """config.RewardSpec dataclasses from (name, kwargs) or (name, kwargs, weight) tuples."""
    return [config.RewardSpec(name=e[0], kwargs=e[1], weight=e[2] if len(e) > 2 else 1.0) for e in entries]


def test_error_classes_are_user_errors():
    assert issubclass(RewardError, UserError) and issubclass(RewardError, ValueError)


def test_build_reward_specs_binds_kwargs_and_weights():
    me = __name__
    specs = build_reward_specs(
        cfg_specs(
            ("correctness", {}, 0.5),
            ("length_penalty", {"max_length": 100, "buffer": 20}),
            (f"{me}:scaled_length", {"scale": 2.0, "offset": 1.0}),
            (f"{me}:any_setting", {"bonus": 3}),
        )
    )
    assert [s.name for s in specs] == ["correctness", "length_penalty", f"{me}:scaled_length", f"{me}:any_setting"]
    assert [s.weight for s in specs] == [0.5, 1.0, 1.0, 1.0] and specs[0].fn is correctness
    # length_penalty's settings reach make_length_penalty: L_max = 100, L_buf = 20 (the column is not used)
    columns = {"completion_lengths": [50, 90, 100], "max_completion_length": [1000] * 3}
    res = score([""] * 3, ["a", "bb", "ccc"], ["1"] * 3, [specs[1], specs[3]], columns=columns)
    assert res.per_fn[:, 0].tolist() == [0.0, -0.5, -1.0]
    assert res.per_fn[:, 1].tolist() == [53.0, 93.0, 103.0]  # setting + column
    res = score([""] * 3, ["a", "bb", "ccc"], ["1"] * 3, [specs[2]])
    assert res.per_fn[:, 0].tolist() == [3.0, 5.0, 7.0]  # 2 * len + 1
    assert build_reward_specs(cfg_specs(("length_penalty", {})))[0].fn is length_penalty


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        (
            "length_penalty",
            {"max_len": 100},
            "reward 'length_penalty' has no setting 'max_len' in its kwargs (did you mean 'max_length'?); "
            "it accepts: max_length, buffer, factor",
        ),
        (
            "correctness",
            {"scale": 2},
            "reward 'correctness' has no setting 'scale' in its kwargs; it accepts: no kwargs",
        ),
        (
            "test_rewards:scaled_length",
            {"scael": 2.0},
            "reward 'test_rewards:scaled_length' has no setting 'scael' in its kwargs (did you mean 'scale'?); "
            "it accepts: scale, offset",
        ),
    ],
)
def test_unknown_kwargs_are_refused_up_front(name, kwargs, message):
    name = name.replace("test_rewards", __name__)
    with pytest.raises(RewardError) as e:
        build_reward_specs(cfg_specs(("xml_count", {}), (name, kwargs)))
    assert str(e.value) == message.replace("test_rewards", __name__)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": "512"}, "max_length='512' must be a whole number >= 1"),
        ({"max_length": 0}, "max_length=0 must be a whole number >= 1"),
        ({"buffer": 2.5}, "buffer=2.5 must be a whole number >= 1"),
        ({"max_length": 10, "buffer": 20}, "buffer=20 is more than max_length=10"),
        ({"factor": "big"}, "factor='big' must be a number"),
    ],
)
def test_length_penalty_settings_are_checked_up_front(kwargs, message):
    with pytest.raises(RewardError) as e:
        build_reward_specs(cfg_specs(("length_penalty", kwargs)))
    assert str(e.value) == f"reward 'length_penalty': kwargs {message}"


def test_unimportable_unknown_and_duplicate_rewards_are_refused():
    with pytest.raises(RewardError, match=r"reward 'no_such_pkg\.mod:fn': cannot import module 'no_such_pkg\.mod'"):
        build_reward_specs(cfg_specs(("no_such_pkg.mod:fn", {})))
    with pytest.raises(RewardError, match=r"has no attribute 'scaled_lenght'; did you mean 'scaled_length'"):
        build_reward_specs(cfg_specs((f"{__name__}:scaled_lenght", {})))
    with pytest.raises(RewardError, match="unknown reward 'corectness'; did you mean 'correctness'"):
        build_reward_specs(cfg_specs(("corectness", {})))
    with pytest.raises(RewardError) as e:
        build_reward_specs(cfg_specs(("correctness", {}), ("xml_count", {}), ("correctness", {}, 2.0)))
    assert str(e.value) == "reward 'correctness' is listed twice in rewards; list each reward once"


def test_a_kwarg_named_like_a_column_is_an_error():
    specs = build_reward_specs(cfg_specs((f"{__name__}:any_setting", {"difficulty": 3})))
    with pytest.raises(RewardError, match=r"kwargs \['difficulty'\] have the names of data columns"):
        score([""], ["a"], ["1"], specs, columns={"difficulty": [1]})


# ----------------------------------------------------------------------------- user functions and their values


def no_columns(prompts, completions, answers):
    """A user reward written without **columns."""
    return [float(len(c)) for c in completions]


def wants_difficulty(prompts, completions, answers, *, difficulty):
    """A user reward that names the one column it reads."""
    return [float(d) for d in difficulty]


def test_a_reward_without_columns_is_scored_in_a_training_batch():
    """The loop always passes completion_lengths and max_completion_length: a function that names none of
    them gets none, instead of failing on every row."""
    columns = {"completion_lengths": [3, 4], "max_completion_length": [8, 8], "difficulty": [1, 2]}
    specs = [RewardSpec("plain", fn=no_columns), RewardSpec("named", fn=wants_difficulty)]
    res = score(["", ""], ["ab", "abc"], ["", ""], specs, columns=columns)
    assert res.per_fn.tolist() == [[2.0, 1.0], [3.0, 2.0]] and res.failures == {"plain": 0, "named": 0}
    bound = build_reward_specs(cfg_specs((f"{__name__}:scaled_length", {"scale": 2.0})))
    assert score([""], ["abc"], [""], bound, columns={"completion_lengths": [3]}).total.tolist() == [6.0]
    with pytest.raises(RewardError, match=r"reward 'named' needs the column 'difficulty'.*completion_lengths"):
        score([""], ["a"], [""], [specs[1]], columns={"completion_lengths": [1]})


def trl_style(completions, **kwargs):
    return [0.0] * len(completions)


def test_a_reward_that_cannot_take_the_three_lists_is_refused_up_front():
    with pytest.raises(RewardError, match=r"reward '.*:trl_style': trl_style\(completions, \*\*kwargs\) cannot be"):
        build_reward_specs(cfg_specs((f"{__name__}:trl_style", {})))
    RewardSpec("star", fn=lambda *args, **kwargs: [])  # any arity
    # a fourth required argument is a data column, passed by name: named when the batch lacks it
    four = RewardSpec("four", fn=lambda p, c, a, difficulty: [float(d) for d in difficulty])
    with pytest.raises(RewardError, match="reward 'four' needs the column 'difficulty'"):
        score([""], ["a"], ["1"], [four])
    assert score([""], ["a"], ["1"], [four], columns={"difficulty": [3]}).total.tolist() == [3.0]


def test_a_data_column_named_like_an_argument_is_an_error():
    with pytest.raises(RewardError, match="data column 'answers'"):
        score([""], ["a"], ["1"], [RewardSpec("correctness")], columns={"answers": [["1"]]})


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"weight": math.nan}, "weight=nan must be a finite number"),
        ({"weight": "2"}, "weight='2' must be a finite number"),
        ({"timeout_s": 0}, "timeout_s=0 must be a finite number > 0 or None"),
        ({"timeout_s": math.inf}, "timeout_s=inf must be a finite number > 0 or None"),
        ({"max_consecutive_timeouts": 0}, "max_consecutive_timeouts=0 must be a whole number >= 1"),
    ],
)
def test_reward_spec_numbers_are_checked(setting, message):
    with pytest.raises(RewardError) as e:
        RewardSpec("correctness", **setting)
    assert str(e.value) == f"reward 'correctness': {message}"


def test_numpy_values_huge_ints_and_complex_numbers():
    np = pytest.importorskip("numpy")
    fn = lambda p, c, a, **_: [np.float32(0.5), np.int64(3), np.bool_(True), np.float64("nan"), 10**400]
    res = score([""] * 5, ["x"] * 5, [""] * 5, [RewardSpec("mine", fn=fn)])
    assert res.per_fn[:3, 0].tolist() == [0.5, 3.0, 1.0] and res.per_fn[3:, 0].isnan().all()
    assert res.nones == {"mine": 2}  # an int past the float range is masked like inf, not a crash
    for value in (np.complex128(1 + 2j), 1 + 2j):
        with pytest.raises(RewardError, match=r"reward 'cx': element 0 is complex"):
            score([""], ["x"], [""], [RewardSpec("cx", fn=lambda p, c, a, v=value, **_: [v])])


def test_an_unknown_reward_names_its_key_and_reads_as_sentences():
    """An unknown name is one line naming rewards.<i>.name, its parts separated (was "unknown reward
    'nosuch' Built-ins: ..."); an unimportable function names its key too."""
    built_ins = (
        "correctness, exact_answer, int_answer, length_penalty, proximity, reward_model, soft_format, "
        "strict_format, think_format, xml_count"
    )
    with pytest.raises(RewardError) as e:
        build_reward_specs(cfg_specs(("correctness", {}), ("nosuch", {})))
    assert str(e.value) == (
        f"rewards.1.name: unknown reward 'nosuch'; the built-ins: {built_ins}; "
        "a user function is written 'package.module:function'"
    )
    with pytest.raises(RewardError) as e:
        build_reward_specs(cfg_specs(("corectness", {})))
    assert str(e.value).startswith(
        f"rewards.0.name: unknown reward 'corectness'; did you mean 'correctness'? The built-ins: {built_ins};"
    )
    with pytest.raises(RewardError, match=r"^rewards\.0\.name: reward 'no_such_pkg\.mod:fn': cannot import module"):
        build_reward_specs(cfg_specs(("no_such_pkg.mod:fn", {})))


def level_and_more(prompts, completions, answers, level, **columns):
    """A user reward that requires one column and takes the rest."""
    return [float(x) for x in level]


def scaled_level(prompts, completions, answers, *, level, scale, **columns):
    return [scale * x for x in level]


def test_a_required_column_is_checked_with_kwargs_too_and_before_the_weights_load():
    """A function with **columns that also requires `level` failed on every row (masked, the run learning
    nothing); it is named at the first scoring, and by check_reward_columns before any weight loads."""
    from minigrpo.rewards import check_reward_columns

    spec = RewardSpec("lvl", fn=level_and_more)
    with pytest.raises(RewardError, match=r"^reward 'lvl' needs the column 'level', which the data does not have"):
        score([""], ["a"], ["1"], [spec], columns={"completion_lengths": [1]})
    assert score([""], ["a"], ["1"], [spec], columns={"level": [4]}).total.tolist() == [4.0]
    bound = build_reward_specs(cfg_specs((f"{__name__}:scaled_level", {"scale": 2.0})))
    for specs in ([spec], bound):
        with pytest.raises(RewardError, match=r"needs the column 'level'.*\(columns: completion_lengths, solution\)"):
            check_reward_columns(specs, ["solution", "completion_lengths"])
        check_reward_columns(specs, ["level"])
    check_reward_columns(build_reward_specs(cfg_specs((f"{__name__}:scaled_length", {"scale": 2.0}))), [])


def test_a_reward_column_the_data_lacks_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    from helpers.runs import run_config

    from minigrpo import build
    from minigrpo.config import Config

    cfg = run_config(tmp_path, rewards=[{"name": f"{__name__}:level_and_more"}])
    monkeypatch.setattr(build, "check_model_source", lambda *a, **k: pytest.fail("the model was read"))
    with pytest.raises(RewardError, match=r"needs the column 'level', which the data does not have \(columns: comp"):
        build.check_before_loading(Config.from_dict(cfg))
