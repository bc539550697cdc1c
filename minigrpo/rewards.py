"""Reward functions of a run: resolving them by name, binding their settings, and scoring safely.

    specs = build_reward_specs(cfg.rewards)       # checked before any weights load
    result = score(prompts, completions, answers, specs, columns=columns)
    result.total                                  # (N,) weighted sum; result.unscored: rewards that scored no row

A reward is named by a built-in name (minigrpo.reward_fns: correctness, xml_count, ...) or as
"package.module:function". score() runs every RewardSpec on the batch; a function that raises or
exceeds its timeout does not stop the run: only its failing rows are masked (NaN) and counted. A
function that breaks the contract (returns neither a list nor a 1-D array, the wrong length, or a string or dict
element) raises RewardError: that is a bug, not a transient failure. A function without **columns gets only
the columns it names; one that cannot take (prompts, completions, answers) first is refused when its spec is made.

The answer parsing (extract_answer, answers_match, ...) and the built-ins are re-exported here, so
`from minigrpo import rewards` is the one import a caller needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import importlib
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from minigrpo.answers import (
    answer_number,
    answers_match,
    extract_answer,
    number_readings,
    reference_answer,
    to_number,
)
from minigrpo.reward_args import (
    bind_settings,
    check_data_arguments,
    check_settings,
    columns_for,
    missing_column,
    setting_names,
)
from minigrpo.reward_fns import (
    GSM8K_SUITE,
    REWARD_FACTORIES,
    REWARDS,
    RewardError,
    RewardFn,
    correctness,
    exact_answer,
    int_answer,
    length_penalty,
    make_length_penalty,
    proximity,
    soft_format,
    strict_format,
    think_format,
    xml_count,
)

if TYPE_CHECKING:
    from minigrpo import config

__all__ = [
    "GSM8K_SUITE",
    "REWARDS",
    "REWARD_FACTORIES",
    "RewardError",
    "RewardFn",
    "RewardResult",
    "RewardSpec",
    "answer_number",
    "answers_match",
    "build_reward_specs",
    "correctness",
    "exact_answer",
    "extract_answer",
    "int_answer",
    "length_penalty",
    "make_length_penalty",
    "number_readings",
    "proximity",
    "reference_answer",
    "resolve_reward",
    "score",
    "soft_format",
    "strict_format",
    "think_format",
    "to_number",
    "xml_count",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- names -> functions


def resolve_reward(name: str, key: str = "") -> RewardFn:
    """A built-in by name, or a user function "package.module:function" (attribute paths may be dotted).
    `key` (`rewards.0.name`) starts the error of a name that resolves to no function, as config errors do."""
    where = f"{key}: " if key else ""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as e:
            raise RewardError(f"{where}reward {name!r}: cannot import module {module_name!r}: {e!r}") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                names = [n for n in dir(obj) if not n.startswith("_")]
                hint = difflib.get_close_matches(part, names, n=1)
                raise RewardError(
                    f"{where}reward {name!r}: {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
            obj = getattr(obj, part)
        if not callable(obj):
            raise RewardError(f"{where}reward {name!r} is {type(obj).__name__}, not a function")
        return obj
    if name in REWARDS:
        return REWARDS[name]
    if name in REWARD_FACTORIES:  # a factory-only built-in (reward_model): its settings are required
        return REWARD_FACTORIES[name]()  # raises the RewardError that names the missing setting
    hint = difflib.get_close_matches(name, [*REWARDS, *REWARD_FACTORIES], n=1)
    known = f"built-ins: {', '.join(sorted({*REWARDS, *REWARD_FACTORIES}))}"
    raise RewardError(
        f"{where}unknown reward {name!r}; "
        + (f"did you mean {hint[0]!r}? The {known}" if hint else f"the {known}")
        + "; a user function is written 'package.module:function'"
    )


def check_reward_columns(specs: Sequence[RewardSpec], columns: Iterable[str]) -> None:
    """RewardError naming a reward and the column it requires that no row of the data has and the loop
    does not add (`columns`: both), before any weight loads rather than at the first scoring."""
    columns = sorted(set(columns))
    for spec in specs:
        fn = getattr(spec.fn, "reward_fn", spec.fn)  # a function with bound kwargs: its own signature
        missing_column(spec.name, fn, columns, getattr(spec.fn, "reward_settings", None))


def make_reward(name: str, kwargs: Mapping[str, Any] | None = None, key: str = "") -> RewardFn:
    """The function of reward `name` with its settings `kwargs` bound; RewardError for an unknown name
    or setting.

    A built-in with settings is built by its factory (REWARD_FACTORIES: `length_penalty` by
    `make_length_penalty(max_length, buffer, factor)`); a built-in without one accepts no kwargs; a
    user function accepts the keyword parameters after (prompts, completions, answers), or any key
    when it takes **kwargs.
    """
    kwargs = dict(kwargs or {})
    if name in REWARD_FACTORIES:
        factory = REWARD_FACTORIES[name]
        check_settings(name, kwargs, setting_names(factory, 0))
        return factory(**kwargs) if kwargs or name not in REWARDS else REWARDS[name]
    fn = resolve_reward(name, key)
    if not kwargs:
        return fn
    check_settings(name, kwargs, [] if name in REWARDS else setting_names(fn, 3))
    return bind_settings(fn, name, kwargs)


def build_reward_specs(cfg_rewards: Sequence[config.RewardSpec]) -> list[RewardSpec]:
    """The run's rewards (the config's `rewards` list) as RewardSpecs, every function resolved and its
    kwargs bound. Raises RewardError, naming the reward, for a duplicate name, an unimportable or
    unknown function and a kwarg the function does not take: all before a model is loaded."""
    specs: list[RewardSpec] = []
    for i, entry in enumerate(cfg_rewards):
        if any(s.name == entry.name for s in specs):
            raise RewardError(f"reward {entry.name!r} is listed twice in rewards; list each reward once")
        fn = make_reward(entry.name, entry.kwargs, key=f"rewards.{i}.name")
        specs.append(RewardSpec(entry.name, fn=fn, weight=entry.weight, timeout_s=entry.timeout_s))
    return specs


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
        _check_spec_numbers(self)
        if self.fn is None:
            self.fn = resolve_reward(self.name)
        check_data_arguments(self.name, self.fn)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_spec_numbers(spec: RewardSpec) -> None:
    """A NaN weight would drop the reward from every total without a word (nansum), and a timeout of 0,
    below 0 or infinite breaks the worker thread's wait: each is refused, naming the reward."""
    if not _is_real(spec.weight) or not math.isfinite(spec.weight):
        raise RewardError(f"reward {spec.name!r}: weight={spec.weight!r} must be a finite number")
    if spec.timeout_s is not None and not (_is_real(spec.timeout_s) and 0 < spec.timeout_s < math.inf):
        raise RewardError(f"reward {spec.name!r}: timeout_s={spec.timeout_s!r} must be a finite number > 0 or None")
    if not isinstance(spec.max_consecutive_timeouts, int) or spec.max_consecutive_timeouts < 1:
        raise RewardError(
            f"reward {spec.name!r}: max_consecutive_timeouts={spec.max_consecutive_timeouts!r} "
            "must be a whole number >= 1"
        )


@dataclasses.dataclass
class RewardResult:
    """Scores of one batch. names[k] heads column k of per_fn.

    per_fn: (N, K) fp64 (a reward of 0.1 stays 0.1 up to the metrics), NaN where masked (None returned, raised,
    timed out). weights: (K,) fp64.
    total: (N,) fp64 = nansum_k weights[k] * per_fn[:, k]; NaN where every reward of the row is masked.
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

    @property
    def unscored(self) -> list[str]:
        """Names of the rewards that scored no row of the batch (every row None/NaN, failed or timed
        out): they add nothing to the total. Empty for an empty batch."""
        if self.per_fn.shape[0] == 0:
            return []
        return [name for k, name in enumerate(self.names) if self.per_fn[:, k].isnan().all()]

    def metrics(self) -> dict[str, float]:
        """Flat floats for the metrics log: reward/<name> (mean over scored rows), reward/<name>/std,
        reward/<name>/failures, reward/<name>/timeouts, reward/<name>/nones, reward/total,
        reward/total_std, reward/masked_rows."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):  # means in fp64, as over the rows gathered from several ranks
            col = self.per_fn[:, k].double()
            col = col[~col.isnan()]
            out[f"reward/{name}"] = col.mean().item() if col.numel() else float("nan")
            out[f"reward/{name}/std"] = _spread(col)
            out[f"reward/{name}/failures"] = float(self.failures[name])
            out[f"reward/{name}/timeouts"] = float(self.timeouts[name])
            out[f"reward/{name}/nones"] = float(self.nones[name])
        total = self.total[~self.total.isnan()].double()
        out["reward/total"] = total.mean().item() if total.numel() else float("nan")
        out["reward/total_std"] = _spread(total)
        out["reward/masked_rows"] = float(self.total.isnan().sum())
        return out


def _spread(values: Tensor) -> float:
    """The std of the scored rows: 0 for one row, NaN for none (like the mean: a 0 would read as "all
    rows alike" where nothing was scored)."""
    return values.std().item() if values.numel() >= 2 else 0.0 if values.numel() else float("nan")


def _awaited(value: Any) -> Any:
    """The value of an `async def` reward's call (run to completion on an event loop of its own), else
    the value itself."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    return asyncio.run(wait())


def _call(fn: RewardFn, args: tuple, kwargs: dict, timeout_s: float | None) -> tuple[str, Any]:
    """("ok", value) | ("error", exception) | ("timeout", None).

    A function that calls sys.exit() fails like one that raises, with or without a timeout (only
    KeyboardInterrupt stops the run).

    With a timeout the call runs in a daemon thread. Python cannot kill a thread: a call that times out
    is abandoned and keeps running in the background until it returns (a daemon thread never blocks
    interpreter exit; a pure-CPU one competes for the GIL meanwhile). Sandbox untrusted code in a
    subprocess inside the reward function itself.
    """
    if timeout_s is None:
        try:
            return "ok", _awaited(fn(*args, **kwargs))
        except (Exception, SystemExit) as e:
            return "error", e
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = _awaited(fn(*args, **kwargs))
        except BaseException as e:  # the worker reports everything, SystemExit included
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return "timeout", None
    return ("error", box["error"]) if "error" in box else ("ok", box["value"])


def _check(name: str, out: Any, n: int) -> list[float | None]:
    """The returned list as floats (None for None, NaN and inf); RewardError if it breaks the contract.
    A 1-D numpy array or torch tensor counts as the list it holds (as many reward functions return)."""
    if getattr(out, "ndim", None) == 1 and callable(getattr(out, "tolist", None)):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        shape = f" of shape {tuple(out.shape)}" if hasattr(out, "shape") else ""
        raise RewardError(
            f"reward {name!r} returned {type(out).__name__}{shape}; expected a list of {n} floats or None"
        )
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if isinstance(v, (str, bytes)) or not hasattr(type(v), "__float__"):
            raise RewardError(
                f"reward {name!r}: element {i} is {type(v).__name__} {_one_line(v)}, not a number or None"
            )
        if isinstance(v, numbers.Complex) and not isinstance(v, numbers.Real):  # float() would drop the imaginary part
            raise RewardError(f"reward {name!r}: element {i} is {type(v).__name__} {_one_line(v)}, not a real number")
        try:
            f = float(v)
        except OverflowError:  # an int past the float range: infinite, masked like inf
            f = math.inf
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(f"reward {name!r}: element {i} ({type(v).__name__}) is not a number") from e
        values.append(f if math.isfinite(f) else None)
    return values


def _one_line(value: Any) -> str:
    """The start of repr(value) on one line (an array's repr spans several): errors are one line."""
    return " ".join(repr(value).split())[:60]


def _score_one(spec: RewardSpec, prompts: list, completions: list, answers: list, columns: dict) -> tuple:
    """(values, n_failed, n_timed_out, first_error) of one function: whole batch first, then per sample."""
    n = len(completions)
    columns = columns_for(spec.name, spec.fn, columns)
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
        raise RewardError(f"reward names must be unique, got {names}")
    cols = dict(columns or {})
    for key, value in cols.items():
        if key in ("prompts", "completions", "answers"):  # it would collide with the function's own argument
            raise RewardError(f"data column {key!r} has the name of a reward function argument; rename the column")
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
            first = f"; first error: {error}" if error is not None else ""  # timeouts alone have none
            log.warning("reward %s: %d of %d rows failed, %d timed out%s", spec.name, failed, n, timed_out, first)
        per_fn[:, k] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)  # (K,)
    weighted = per_fn * weights  # (N, K)
    total = torch.where(per_fn.isnan().all(1), math.nan, weighted.nansum(1))  # (N,)
    return RewardResult(
        names=[s.name for s in specs],
        weights=weights,
        per_fn=per_fn,
        total=total,
        failures=failures,
        timeouts=timeouts,
        nones=nones,
        errors=errors,
        seconds=seconds,
    )
