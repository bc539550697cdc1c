"""Reward functions, their registry, and safe scoring (failures and timeouts masked, counted, reported).

A reward function scores a whole batch:

    fn(prompts: list[str], completions: list[str], answers: list[str], **columns) -> list[float | None]

columns are extra per-row dataset columns (lists of length N) and what the loop adds, e.g.
completion_lengths (tokens). None means "no score for this row" and is masked, never read as 0.

Built-ins (REWARDS), for the GSM8K format used by the popular GRPO notebooks

    <reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n

    correctness 2.0 / 0.0     int_answer 0.5 / 0.0     strict_format, soft_format 0.5 / 0.0
    xml_count [-0.5, 0.5]     proximity [-1, 1]        length_penalty [-1, 0]     exact_answer 1.0 / 0.0

A user function is named "package.module:function" (resolve_reward). score() runs every RewardSpec on
the batch; a function that raises or exceeds its timeout does not stop the run: only its failing rows
are masked (NaN) and counted. A function that breaks the contract (returns a non-list, the wrong
length, or a string or dict element) raises RewardError: that is a bug, not a transient failure.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]


class RewardError(ValueError):
    """A reward function or its name is wrong (contract broken, unknown name, missing column): raised."""


# ----------------------------------------------------------------------------- answer parsing

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]  # unclosed: the rest


def to_number(s: str | None) -> float | None:
    """The number a whole answer string spells, else None.

    Strips spaces, "$" and "\\$", a "%" suffix, a trailing "." and \\boxed{}; removes thousands
    separators ("1,234" and "1{,}234"); reads integers, decimals, "a/b" and \\frac{a}{b}.
    """
    if s is None:
        return None
    s = s.strip()
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    s = s.replace("\\$", "").replace("$", "").replace("{,}", ",").replace("\\!", "").strip()
    s = s.removesuffix("\\%").removesuffix("%").rstrip(".").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return float(s)
    frac = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s)
    if frac and int(frac[2]) != 0:
        return int(frac[1]) / int(frac[2])
    frac = _FRAC.fullmatch(s)
    if frac and int(frac[3]) != 0:
        return (-1 if frac[1] == "-" else 1) * int(frac[2]) / int(frac[3])
    return None


def answer_number(s: str | None) -> float | None:
    """to_number(s), or the single number in s ("18 dollars" -> 18); None if there are 0 or 2+."""
    value = to_number(s)
    if value is not None or s is None:
        return value
    found = _NUMBER.findall(s)
    return to_number(found[0]) if len(found) == 1 else None


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The answer a completion gives, as a raw string, by the first rule that applies:

    1. the content of the last <answer>...</answer> (an unclosed <answer>: everything after it);
    2. the content of the last \\boxed{...};
    3. the rest of the line after the last "####";
    4. if last_number: the last number in the text.
    """
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if "<answer>" in text:
        return text.rsplit("<answer>", 1)[1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    if last_number:
        found = _NUMBER.findall(text)
        return found[-1] if found else None
    return None


def _reference(answer: Any) -> str | None:
    """The reference answer; a full GSM8K solution is cut to what follows its "####"."""
    if answer is None:
        return None
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Numerically equal (rel 1e-9: "18" == "18.0" == "$18" == "18."), else equal as normalised text."""
    if pred is None or ref is None:
        return False
    p, r = answer_number(pred), to_number(ref)
    if p is not None and r is not None:
        return math.isclose(p, r, rel_tol=1e-9, abs_tol=1e-12)
    norm = lambda s: re.sub(r"\s+", " ", s.replace("$", "")).strip().rstrip(".").strip().lower()
    return r is None and norm(pred) == norm(ref)


# ----------------------------------------------------------------------------- built-in rewards


def correctness(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """2.0 if the extracted answer (extract_answer) matches the reference, else 0.0; None without one."""
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = _reference(a)
        out.append(None if not ref else 2.0 * answers_match(extract_answer(c), ref))
    return out


def int_answer(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 if the marked answer (tags, \\boxed or ####; no last-number fallback) is an integer value.

    "18", "-3", "1,234", "$5" and "18.0" count; "2.5", "x" and an unmarked answer do not.
    """
    out: list[float | None] = []
    for c in completions:
        value = answer_number(extract_answer(c, last_number=False))
        out.append(0.5 if value is not None and float(value).is_integer() else 0.0)
    return out


_NO_TAG = r"(?:(?!</?reasoning>|</?answer>).)*"
_STRICT = re.compile(rf"\A<reasoning>\n{_NO_TAG}\n</reasoning>\n<answer>\n{_NO_TAG}\n</answer>\n?\Z", re.DOTALL)
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def strict_format(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 if the whole completion is exactly the multi-line format: one reasoning block, one answer
    block, each tag on its own line, nothing before or after (the final newline is optional because
    generation stops at EOS)."""
    return [0.5 if _STRICT.match(c) else 0.0 for c in completions]


def soft_format(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 if <reasoning>...</reasoning> followed by <answer>...</answer> appears anywhere."""
    return [0.5 if _SOFT.search(c) else 0.0 for c in completions]


def xml_count(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """Partial credit for the format: 0.125 for each of "<reasoning>\\n", "\\n</reasoning>\\n",
    "\\n<answer>\\n" and "\\n</answer>" appearing exactly once, minus 0.001 per non-space character after
    the last </answer> (the penalty is capped at 0.5, so the reward lies in [-0.5, 0.5])."""
    out: list[float | None] = []
    for c in completions:
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
    read from the answer; None (masked) if the reference is not a number.
    """
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = to_number(_reference(a))
        if ref is None:
            out.append(None)
            continue
        pred = answer_number(extract_answer(c))
        if pred is None:
            out.append(-1.0)
            continue
        err = abs(pred - ref) / max(abs(ref), 1.0)
        out.append(2.0 * 2.0 ** (-err / PROXIMITY_HALF_LIFE) - 1.0)
    return out


def make_length_penalty(max_length: int | None = None, buffer: int | None = None, factor: float = 1.0) -> RewardFn:
    """DAPO overlong shaping: factor * clamp(-(L - (L_max - L_buf)) / L_buf, -1, 0).

    0 up to L_max - L_buf, then linear down to -factor at L_max (and held there beyond). L is the
    completion_lengths column (tokens) when the loop passes it, else the length in characters: give
    max_length in the same unit. L_max is max_length or else the max_completion_length column (one per
    row; an int when called directly); L_buf is buffer or else L_max // 5 (DAPO: 4096 of 20480).
    """

    def length_penalty(prompts: list, completions: list[str], answers: list, **columns: Any) -> list[float | None]:
        L_max = max_length if max_length is not None else columns.get("max_completion_length")
        if L_max is None:
            raise RewardError("length_penalty needs max_length or a max_completion_length column")
        lengths = columns.get("completion_lengths")
        if lengths is None:
            lengths = [len(c) for c in completions]
        out: list[float | None] = []
        for i, L in enumerate(lengths):
            limit = L_max[i] if isinstance(L_max, (list, tuple)) else L_max
            buf = buffer if buffer is not None else max(int(limit) // 5, 1)
            out.append(factor * min(max(-(int(L) - (limit - buf)) / buf, -1.0), 0.0))
        return out

    return length_penalty


length_penalty = make_length_penalty()


def exact_answer(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """Synthetic arithmetic: 1.0 if the <answer> tag content, or without tags the FIRST number of the
    completion, equals the reference (numerically when both parse); None without a reference."""
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        ref = _reference(a)
        if not ref:
            out.append(None)
            continue
        tags = _ANSWER_TAG.findall(c)
        found = _NUMBER.findall(c)
        pred = tags[-1].strip() if tags else (found[0] if found else None)
        out.append(1.0 if answers_match(pred, ref) else 0.0)
    return out


REWARDS: dict[str, RewardFn] = {
    "correctness": correctness,
    "int_answer": int_answer,
    "strict_format": strict_format,
    "soft_format": soft_format,
    "xml_count": xml_count,
    "proximity": proximity,
    "length_penalty": length_penalty,
    "exact_answer": exact_answer,
}
GSM8K_SUITE = ("xml_count", "soft_format", "strict_format", "int_answer", "correctness")


def resolve_reward(name: str) -> RewardFn:
    """A built-in by name, or a user function "package.module:function" (attribute paths may be dotted)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as e:
            raise RewardError(f"reward {name!r}: cannot import module {module_name!r}: {e!r}") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                names = [n for n in dir(obj) if not n.startswith("_")]
                hint = difflib.get_close_matches(part, names, n=1)
                raise RewardError(
                    f"reward {name!r}: {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
            obj = getattr(obj, part)
        if not callable(obj):
            raise RewardError(f"reward {name!r} is {type(obj).__name__}, not a function")
        return obj
    if name in REWARDS:
        return REWARDS[name]
    hint = difflib.get_close_matches(name, REWARDS, n=1)
    raise RewardError(
        f"unknown reward {name!r}"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Built-ins: {', '.join(sorted(REWARDS))}; a user function is written 'package.module:function'."
    )


# ----------------------------------------------------------------------------- safe scoring


@dataclasses.dataclass
class RewardSpec:
    """One reward function of a run: its name, the function (resolved from the name if None), its weight
    in the total and its timeout (None: no timeout, the function runs in the calling thread).
    max_consecutive_timeouts: in the per-sample fallback, after this many timeouts in a row the
    remaining rows are not tried but masked and counted as timeouts (so a hung service costs
    about (1 + max_consecutive_timeouts) * timeout_s, not N * timeout_s)."""

    name: str
    fn: RewardFn | None = None
    weight: float = 1.0
    timeout_s: float | None = 10.0
    max_consecutive_timeouts: int = 2

    def __post_init__(self) -> None:
        if self.fn is None:
            self.fn = resolve_reward(self.name)


@dataclasses.dataclass
class RewardResult:
    """Scores of one batch. names[k] heads column k of per_fn.

    per_fn: (N, K) fp32, NaN where masked (None returned, raised, timed out).
    total: (N,) fp32 = nansum_k weights[k] * per_fn[:, k]; NaN where every reward of the row is masked.
    failures / timeouts / nones: per name, rows masked because the function raised / timed out /
    returned None (or NaN, inf). errors: per name, the first exception seen. seconds: wall time per name.
    """

    names: list[str]
    weights: Tensor
    per_fn: Tensor
    total: Tensor
    failures: dict[str, int]
    timeouts: dict[str, int]
    nones: dict[str, int]
    errors: dict[str, str]
    seconds: dict[str, float]

    def metrics(self) -> dict[str, float]:
        """Flat floats for the metrics log: reward/<name> (mean over scored rows), reward/<name>/std,
        reward/<name>/failures, reward/<name>/timeouts, reward/<name>/nones, reward/total,
        reward/total_std, reward/masked_rows."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            col = self.per_fn[:, k]
            col = col[~col.isnan()]
            out[f"reward/{name}"] = col.mean().item() if col.numel() else float("nan")
            out[f"reward/{name}/std"] = col.std().item() if col.numel() >= 2 else 0.0
            out[f"reward/{name}/failures"] = float(self.failures[name])
            out[f"reward/{name}/timeouts"] = float(self.timeouts[name])
            out[f"reward/{name}/nones"] = float(self.nones[name])
        total = self.total[~self.total.isnan()]
        out["reward/total"] = total.mean().item() if total.numel() else float("nan")
        out["reward/total_std"] = total.std().item() if total.numel() >= 2 else 0.0
        out["reward/masked_rows"] = float(self.total.isnan().sum())
        return out


def _call(fn: RewardFn, args: tuple, kwargs: dict, timeout_s: float | None) -> tuple[str, Any]:
    """("ok", value) | ("error", exception) | ("timeout", None).

    With a timeout the call runs in a daemon thread. Python cannot kill a thread: a call that times out
    is abandoned and keeps running in the background until it returns (a daemon thread never blocks
    interpreter exit; a pure-CPU one competes for the GIL meanwhile). Sandbox untrusted code in a
    subprocess inside the reward function itself.
    """
    if timeout_s is None:
        try:
            return "ok", fn(*args, **kwargs)
        except Exception as e:
            return "error", e
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # the worker reports everything, SystemExit included
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", None
    return ("error", box["error"]) if "error" in box else ("ok", box["value"])


def _check(name: str, out: Any, n: int) -> list[float | None]:
    """The returned list as floats (None for None, NaN and inf); RewardError if it breaks the contract."""
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}; expected a list of {n} floats or None")
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if isinstance(v, (str, bytes)) or not hasattr(type(v), "__float__"):
            raise RewardError(f"reward {name!r}: element {i} is {type(v).__name__} {v!r:.60}, not a number or None")
        try:
            f = float(v)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(f"reward {name!r}: element {i} ({type(v).__name__}) is not a number") from e
        values.append(f if math.isfinite(f) else None)
    return values


def _score_one(spec: RewardSpec, prompts: list, completions: list, answers: list, columns: dict) -> tuple:
    """(values, n_failed, n_timed_out, first_error) of one function: whole batch first, then per sample."""
    n = len(completions)
    status, out = _call(spec.fn, (prompts, completions, answers), columns, spec.timeout_s)
    if status == "ok":
        return _check(spec.name, out, n), 0, 0, None
    if isinstance(out, RewardError):
        raise out
    first_error = None if status == "timeout" else f"{type(out).__name__}: {out}"
    values: list[float | None] = [None] * n
    failed = timed_out = streak = 0
    for i in range(n):
        if streak >= spec.max_consecutive_timeouts:
            timed_out += n - i
            break
        row = {k: v[i : i + 1] for k, v in columns.items()}
        status, out = _call(
            spec.fn, (prompts[i : i + 1], completions[i : i + 1], answers[i : i + 1]), row, spec.timeout_s
        )
        if status == "ok":
            values[i] = _check(spec.name, out, 1)[0]
            streak = 0
        elif status == "timeout":
            timed_out += 1
            streak += 1
        else:
            if isinstance(out, RewardError):
                raise out
            failed += 1
            streak = 0
            first_error = first_error or f"{type(out).__name__}: {out}"
    return values, failed, timed_out, first_error


def score(
    prompts: Sequence,
    completions: Sequence[str],
    answers: Sequence,
    specs: Sequence[RewardSpec],
    *,
    columns: Mapping[str, Sequence] | None = None,
) -> RewardResult:
    """Score N completions with K reward functions; failures mask rows, they never stop the run.

    Each function is called once on the whole batch (in a worker thread when it has a timeout). If that
    call raises or times out, it is called again per sample, each call with the timeout, so only the
    failing rows are masked and counted. A RewardError (contract broken) is raised.
    """
    n = len(completions)
    if len(prompts) != n or len(answers) != n:
        raise ValueError(f"prompts ({len(prompts)}), completions ({n}) and answers ({len(answers)}) differ")
    if not specs:
        raise ValueError("score needs at least one RewardSpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    cols = dict(columns or {})
    for key, value in cols.items():
        if len(value) != n:
            raise ValueError(f"column {key!r} has {len(value)} rows, expected {n}")
    prompts, completions, answers = list(prompts), list(completions), list(answers)
    per_fn = torch.full((n, len(specs)), float("nan"), dtype=torch.float64)  # (N, K)
    failures, timeouts, nones, errors, seconds = {}, {}, {}, {}, {}
    for k, spec in enumerate(specs):
        start = time.perf_counter()
        values, failed, timed_out, error = _score_one(spec, prompts, completions, answers, cols)
        seconds[spec.name] = time.perf_counter() - start
        failures[spec.name], timeouts[spec.name] = failed, timed_out
        nones[spec.name] = sum(v is None for v in values) - failed - timed_out
        if error is not None:
            errors[spec.name] = error
        if failed or timed_out:
            log.warning(
                "reward %s: %d of %d rows failed, %d timed out; first error: %s", spec.name, failed, n, timed_out, error
            )
        per_fn[:, k] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)  # (K,)
    weighted = per_fn * weights  # (N, K)
    total = torch.where(per_fn.isnan().all(1), math.nan, weighted.nansum(1))  # (N,)
    return RewardResult(
        names=[s.name for s in specs],
        weights=weights.float(),
        per_fn=per_fn.float(),
        total=total.float(),
        failures=failures,
        timeouts=timeouts,
        nones=nones,
        errors=errors,
        seconds=seconds,
    )
