"""The built-in reward functions, and what every reward function promises (its contract).

A reward function scores a whole batch:

    fn(prompts: list[str], completions: list[str], answers: list[str], **columns) -> list[float | None]

columns are extra per-row dataset columns (lists of length N) and what the loop adds, e.g.
completion_lengths (tokens after the prompt; an episode's count the tools' too). None means "no score
for this row" and is masked, never read as 0. Every built-in returns None for a completion that is
None (no text to score).

Built-ins (REWARDS), for the GSM8K format used by the popular GRPO notebooks

    <reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n

    correctness 2.0 / 0.0     int_answer 0.5 / 0.0     strict_format, soft_format 0.5 / 0.0
    xml_count [-0.5, 0.5]     proximity [-1, 1]        length_penalty [-1, 0]     exact_answer 1.0 / 0.0

and for reasoning models' <think>...</think> answer layout: think_format 0.5 / 0.0.

    reward_model: the scores of a reward model checkpoint (kwargs path, batch_size, max_length, ...)

A built-in with settings (length_penalty, reward_model) is made by its factory (REWARD_FACTORIES): a run's
`rewards[].kwargs` are the factory's arguments, checked when the run is built (rewards.build_reward_specs).

A reward that runs a model (reward_model) on device "auto" or "cuda" loads it on the run's device, the
policy's: whoever places the policy says where with set_run_device(device) (run.device=cuda:1 in one
process is GPU 1, though the current CUDA device is 0, and a reward scored in its timeout thread sees 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from minigrpo.answers import (
    ANSWER_TAG,
    NUMBER,
    answer_value,
    answers_match,
    extract_answer,
    number_readings,
    reference_answer,
    to_number,
)
from minigrpo.errors import UserError

RewardFn = Callable[..., list]
_RUN_DEVICE: list = [None]  # [torch.device | None]: the run's device, once set_run_device names it


class RewardError(UserError, ValueError):
    """A reward function or its name is wrong (contract broken, unknown name or kwarg, missing column)."""


def correctness(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """2.0 if the extracted answer (extract_answer) matches the reference, else 0.0; None without one."""
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = reference_answer(a)
        out.append(None if not ref or c is None else 2.0 * answers_match(extract_answer(c), ref))
    return out


def int_answer(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 if the marked answer (tags, \\boxed or ####; no last-number fallback) is an integer value.

    "18", "-3", "1,234", "$5", "18.0" and "2^{10}" count; "2.5", "x" and an unmarked answer do not.
    """
    out: list[float | None] = []
    for c in completions:
        value = answer_value(extract_answer(c, last_number=False))
        out.append(None if c is None else 0.5 if value is not None and float(value).is_integer() else 0.0)
    return out


_NO_TAG = r"(?:(?!</?reasoning>|</?answer>).)*"
_STRICT = re.compile(rf"\A<reasoning>\n{_NO_TAG}\n</reasoning>\n<answer>\n{_NO_TAG}\n</answer>\n?\Z", re.DOTALL)
_SOFT = re.compile(r"<reasoning>(?:(?!<reasoning>).)*?</reasoning>\s*<answer>(?:(?!<answer>).)*?</answer>", re.DOTALL)


def strict_format(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 if the whole completion is exactly the multi-line format: one reasoning block, one answer
    block, each tag on its own line, nothing before or after (the final newline is optional because
    generation stops at EOS). Windows line ends ("\\r\\n") are line breaks too."""
    return [None if c is None else 0.5 if _STRICT.match(_unix_lines(c)) else 0.0 for c in completions]


def _unix_lines(text: str) -> str:
    """text with "\\r\\n" line ends as "\\n": a line break in the format, however the model spelled it."""
    return text.replace("\r\n", "\n")


def soft_format(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 if <reasoning>...</reasoning> followed by <answer>...</answer> appears anywhere."""
    return [None if c is None else 0.5 if _SOFT.search(c) else 0.0 for c in completions]


# R1 style: the reasoning in one <think> block (its opening may be the prompt's: R1-distill templates end the
# generation prompt with "<think>\n"), closed once, then the answer; no second block. Checked by counting tags, not
# by one regex: a pattern "(no tag)* </think> (no tag)* non-space (no tag)*" backtracks quadratically on a long
# answer that ends in a tag (100 KB took minutes), and its non-space could be the "<" of a second tag.


def think_format(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 for the reasoning models' format: one <think>...</think> block (its "<think>" may be the prompt's
    last tag, as R1-distill and QwQ templates write it) and a non-empty answer after it, no other think tag."""
    return [None if c is None else 0.5 if _one_think_block(c) else 0.0 for c in completions]


def _one_think_block(text: str) -> bool:
    """Whether text is [space] [<think>] reasoning </think> answer, with no other think tag and an answer that
    is not blank; linear time in the length of text."""
    body = text.lstrip().removeprefix("<think>")
    if "<think>" in body or body.count("</think>") != 1:
        return False
    return bool(body.split("</think>", 1)[1].strip())


def xml_count(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """Partial credit for the format: 0.125 for each of "<reasoning>\\n", "\\n</reasoning>\\n",
    "\\n<answer>\\n" and "\\n</answer>" appearing exactly once, minus 0.001 per non-space character after
    the last </answer> (the penalty is capped at 0.5, so the reward lies in [-0.5, 0.5]); "\\r\\n" is a "\\n"."""
    out: list[float | None] = []
    for c in completions:
        if c is None:
            out.append(None)
            continue
        c = _unix_lines(c)
        value = 0.125 * sum(
            c.count(t) == 1 for t in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
        )
        if "</answer>" in c:
            trailing = re.sub(r"\s", "", c.rsplit("</answer>", 1)[1])
            value -= min(0.001 * len(trailing), 0.5)
        out.append(value)
    return out


PROXIMITY_HALF_LIFE = 0.1


def proximity(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """Dense numeric reward: 2 * 2**(-e / 0.1) - 1 with relative error e = |pred - ref| / max(|ref|, 1).

    1.0 when exact, 0.0 at 10% off, -0.5 at 20%, towards -1.0 when far off; -1.0 if no number can be
    read from the answer; None (masked) if the reference is not a number or there is no completion. The
    numbers are read as correctness reads them (answers.number_readings: "18 dollars" is 18; "50%" is 50
    or 0.5, the nearer counts).
    """
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = reference_answer(a)
        if c is None or answer_value(ref) is None:
            out.append(None)
            continue
        pairs = number_readings(extract_answer(c), ref)
        if not pairs:
            out.append(-1.0)
            continue
        err = min(abs(pred - r) / max(abs(r), 1.0) for pred, r in pairs)
        out.append(2.0 * 2.0 ** (-err / PROXIMITY_HALF_LIFE) - 1.0)
    return out


def make_length_penalty(max_length: int | None = None, buffer: int | None = None, factor: float = 1.0) -> RewardFn:
    """DAPO overlong shaping: factor * clamp(-(L - (L_max - L_buf)) / L_buf, -1, 0).

    0 up to L_max - L_buf, then linear down to -factor at L_max (and held there beyond). L is the
    completion_lengths column (tokens) when the loop passes it, else the length in characters: give
    max_length in the same unit. L_max is max_length or else the max_completion_length column (one per
    row; an int when called directly); L_buf is buffer or else L_max // 5 (DAPO: 4096 of 20480).

    The loop's two columns share one unit: a single-turn row's sampled tokens against max_new_tokens;
    a multi-turn episode's tokens after the prompt, the model's and the tools' alike, against its budget
    env.max_episode_tokens (there is no budget of the model's own tokens), so an episode that used its
    whole budget gets -factor.
    """
    for key, value in (("max_length", max_length), ("buffer", buffer)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RewardError(f"reward 'length_penalty': kwargs {key}={value!r} must be a whole number >= 1")
    if max_length is not None and buffer is not None and buffer > max_length:
        raise RewardError(f"reward 'length_penalty': kwargs buffer={buffer} is more than max_length={max_length}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise RewardError(f"reward 'length_penalty': kwargs factor={factor!r} must be a number")
    if not math.isfinite(factor):  # NaN rewards read as unscored: the reward would vanish without a word
        raise RewardError(f"reward 'length_penalty': kwargs factor={factor!r} must be a finite number")

    def length_penalty(prompts: list, completions: list[str], answers: list, **columns: Any) -> list[float | None]:
        L_max = max_length if max_length is not None else columns.get("max_completion_length")
        if L_max is None:
            raise RewardError("length_penalty needs max_length or a max_completion_length column")
        lengths = columns.get("completion_lengths")
        if lengths is None:
            lengths = [None if c is None else len(c) for c in completions]
        out: list[float | None] = []
        for i, L in enumerate(lengths):
            if L is None or completions[i] is None:  # no text to score, whatever length the column gives it
                out.append(None)
                continue
            limit = L_max[i] if isinstance(L_max, (list, tuple)) else L_max
            if buffer is not None and buffer > limit:  # the penalty would start below length 0
                raise RewardError(
                    f"reward 'length_penalty': kwargs buffer={buffer} is more than the maximum length {limit} "
                    "(max_completion_length): give buffer <= it, or max_length"
                )
            buf = buffer if buffer is not None else max(int(limit) // 5, 1)
            out.append(factor * min(max(-(int(L) - (limit - buf)) / buf, -1.0), 0.0))
        return out

    return length_penalty


length_penalty = make_length_penalty()


def exact_answer(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """Synthetic arithmetic: 1.0 if the <answer> tag content, or without tags the FIRST number of the
    completion, equals the reference (numerically when both parse); None without a reference. The first number is
    read whole ("3/4 of it", "1 1/2", "\\frac{3}{4}", "1.5 \\times 10^3", "50%"; "7. Because 3 + 4" is 7); past a
    closed reasoning block only the text after its "</think>" is read, as extract_answer reads it (drafts are no
    answer)."""
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = reference_answer(a)
        if not ref or c is None:
            out.append(None)
            continue
        if "</think>" in c and c.rsplit("</think>", 1)[1].strip():
            c = c.rsplit("</think>", 1)[1]
        tags = ANSWER_TAG.findall(c)
        pred = tags[-1].strip() if tags else _first_number(c)
        out.append(1.0 if answers_match(pred, ref) else 0.0)
    return out


# a LaTeX fraction of whole numbers: "\frac{3}{4}", "\dfrac{-3}{4}", "\frac34"
_FRAC = r"\\[dt]?frac\s*(?:\{\s*[-\u2212]?\d+\s*\}|\d)\s*(?:\{\s*\d+\s*\}|\d)"
# where the first number of a text starts: a LaTeX fraction ("-\frac{3}{4}") before the digits in it, or a number
_FIRST = re.compile(rf"[-\u2212]?{_FRAC}|{NUMBER.pattern}")
# what may follow a leading number and belongs to it: the fraction of a mixed number (" 1/2", "\frac{1}{2}") and
# "/4" of a fraction after a whole number (not "/25" of a date, "12/25/2024"), "\times 10^3" of scientific
# notation after any, then a percent sign ("50%", "50 percent")
_WHOLE_TAILS = tuple(
    re.compile(tail)
    for tail in (r"[ \t]+\d+[ \t]*/[ \t]*\d+(?![\d/]|[.,]\d)", rf"[ \t]*{_FRAC}", r"[ \t]*/[ \t]*\d+(?![\d/]|[.,]\d)")
)
_TEN_POWER_TAIL = re.compile(r"\s*(?:\\times|\\cdot|\u00d7|x|\*)\s*10\s*(?:\^|\*\*)\s*\{?\s*[-+]?\d+\s*\}?")
_PERCENT_TAIL = re.compile(r"[ \t]*(?:\\?%|percent\b)")


def _first_number(text: str) -> str | None:
    """The first number of the text, read whole as answers.answer_number reads it: with the fraction, mixed number,
    power of ten or percent sign it starts ("3/4 of the cake" is "3/4", "1 1/2 cups" is "1 1/2"); None for none."""
    first = _FIRST.search(text)
    if first is None:
        return None
    end = first.end()
    whole = re.fullmatch(r"[-\u2212]?\d+", first[0]) is not None
    for tail in (*(_WHOLE_TAILS if whole else ()), _TEN_POWER_TAIL) if "frac" not in first[0] else ():
        rest = tail.match(text, end)
        if rest and to_number(text[first.start() : rest.end()]) is not None:
            end = rest.end()
            break
    percent = _PERCENT_TAIL.match(text, end)
    return text[first.start() : percent.end() if percent else end]


def make_reward_model(
    path: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: str | None = "auto",
) -> RewardFn:
    """A reward model's scores (a *ForSequenceClassification checkpoint, num_labels=1) as a reward;
    see minigrpo.models.reward_model.make_reward_model for the settings. Imported when used."""
    from minigrpo.models.reward_model import make_reward_model as make

    return make(path, batch_size, max_length, device, dtype, chat_template)


def set_run_device(device: Any) -> None:
    """Name the device the run's policy is on (a torch.device or its name; None forgets it), before the first
    scoring: a reward model on device "auto" or "cuda" loads there. A CUDA device without an index is the
    current one of the calling thread (the one the policy went to), fixed now: the rewards are scored in
    threads of their own, whose current device is always 0."""
    import torch

    where = None if device is None else torch.device(device)
    if where is not None and where.type == "cuda" and where.index is None and torch.cuda.is_available():
        where = torch.device("cuda", torch.cuda.current_device())
    _RUN_DEVICE[0] = where


def run_device() -> Any:
    """The torch.device set_run_device named, None when none was."""
    return _RUN_DEVICE[0]


def reward_device(device: str) -> Any:
    """The torch.device a reward model's `device` setting loads it on, with its index ("cuda" and "cuda:0"
    share one loaded copy).

    "auto" is the run's device (reward_fns.set_run_device; without one: CUDA if available, else the
    CPU) and "cuda" the run's device when that is a GPU: the policy's GPU, which need not be the
    current one (run.device=cuda:1 in one process; a reward scored in its timeout thread, whose
    current device is CUDA's default). "cpu" and "cuda:N" are taken as they are. An index left open
    is the current device's."""
    import torch

    run = run_device()
    if device == "auto":
        where = run if run is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device == "cuda" and run is not None and run.type == "cuda":
        where = run
    else:
        where = torch.device(device)
    if where.type == "cuda" and where.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return where


REWARDS: dict[str, RewardFn] = {
    "correctness": correctness,
    "int_answer": int_answer,
    "strict_format": strict_format,
    "soft_format": soft_format,
    "think_format": think_format,
    "xml_count": xml_count,
    "proximity": proximity,
    "length_penalty": length_penalty,
    "exact_answer": exact_answer,
}
GSM8K_SUITE = ("xml_count", "soft_format", "strict_format", "int_answer", "correctness")
# Built-ins with settings: name -> factory. Its parameters are the keys `rewards[].kwargs` may set.
# `reward_model` has no plain form (its path is required): it is a factory only.
REWARD_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "length_penalty": make_length_penalty,
    "reward_model": make_reward_model,
}
