"""Limits written beside their config fields, and the check that enforces them.

    lr: float = spec(1e-6, ">= 0")                       # a bound, in the words its error message uses
    device: str = spec("auto", match=r"auto|cpu|cuda.*", why="auto, cpu or cuda[:N]")

`check_limits(cfg)` walks a tree of dataclasses and returns one message per value outside its field's
limit, pattern or cap (`MAX_COUNT`: no run can use a larger count; `MAX_SECONDS`: no timer waits longer).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import threading
from typing import Any


def join_key(path: str, key: object) -> str:
    """The dotted key of `key` under `path` ("train" + "lr" -> "train.lr")."""
    return f"{path}.{key}" if path else str(key)


_LIMIT_RE = re.compile(r"^(any|finite|(>=|>|<=|<) \S+|in [\[(]\S+, \S+[\])])$")
_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
# a count past int32 cannot run: more steps than a run can take, more rows or tokens than a tensor can hold
MAX_COUNT = 2**31 - 1
MAX_EXACT_INT = 2**53  # a float beyond it holds no exact integer (1e300 as an int would be 1000...052504...)
# a timeout past what Python's timers wait (threading.TIMEOUT_MAX: about 292 years on Linux, 49 days on
# Windows) raises OverflowError in the wait itself, mid-run: 1e9 s (about 31 years) where the platform allows
MAX_SECONDS = float(min(10**9, int(threading.TIMEOUT_MAX)))
# why a value past a field's `most` cannot run, for its error message
_BEYOND_MOST = {MAX_COUNT: "no run can use a larger count", MAX_SECONDS: "longer than a timer can wait"}


def within(limit: str, v: float) -> bool:
    """Whether `v` meets a limit written as its error message says it: "any", "finite", "> 0",
    ">= 1", "<= 1", "< 1", or an interval "in (0, 1]". NaN meets only "any", infinity only "any"
    (a bound is a number: `temperature: .inf` is a mistake, not a very large temperature)."""
    if limit == "any":
        return True
    if not isinstance(v, int) and not math.isfinite(v):  # an int is finite (and may be too large for a float)
        return False
    if limit == "finite":
        return True
    if limit.startswith("in "):
        lo, hi = limit[4:-1].split(", ")
        above = f"{'>' if limit[3] == '(' else '>='} {lo}"
        below = f"{'<' if limit[-1] == ')' else '<='} {hi}"
        return within(above, v) and within(below, v)
    op, bound = limit.split(" ")
    return _COMPARE[op](v, float(bound))


def spec(default: Any, limit: str | None = None, *, most: int | None = None, match="", why="", derived="") -> Any:
    """A dataclass field with its limit beside it: `lr: float = spec(1e-6, ">= 0")` (see `within`),
    or a pattern a text must match whole: `spec("auto", match=r"cpu|cuda", why="cpu or cuda")`.

    `most` caps a value beyond which the run cannot work (`MAX_COUNT`, `MAX_SECONDS`), checked apart from `limit`;
    `why` ends a limit's error message and is the whole description of a pattern's; `derived` names
    what fills a None default (in a `__post_init__`, only while None), for readers and tests.
    """
    if limit is not None and not _LIMIT_RE.match(limit):
        raise ValueError(f"bad limit {limit!r}: use any, finite, '>= x', '> x', '<= x', '< x' or 'in [a, b)'")
    metadata = {"limit": limit, "most": most, "match": match, "why": why, "derived": derived}
    return dataclasses.field(default=default, metadata=metadata)


def check_limits(obj: Any, path: str = "") -> list[str]:
    """One message per value outside its field's limit or pattern, walking nested dataclasses and
    lists of them. None ("off") always passes; a list or tuple is checked element by element."""
    errors: list[str] = []
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            if dataclasses.is_dataclass(item):
                errors += check_limits(item, join_key(path, i))
        return errors
    for f in dataclasses.fields(obj):
        key, value = join_key(path, f.name), getattr(obj, f.name)
        limit, pattern, why = f.metadata.get("limit"), f.metadata.get("match"), f.metadata.get("why")
        values = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]
        shown = list(value) if isinstance(value, tuple) else value
        if limit and not all(within(limit, v) for v in values):
            errors.append(f"{key} must be {limit}, got {shown}" + (f" ({why})" if why else ""))
        elif (most := f.metadata.get("most")) is not None and any(v > most for v in values):
            cap = most if isinstance(most, int) else f"{most:g}"  # 2147483647, 1e+09
            errors.append(f"{key} must be <= {cap}, got {shown} ({_BEYOND_MOST.get(most, 'no run can use more')})")
        if pattern and not all(re.fullmatch(pattern, v) for v in values):
            errors.append(f"{key} must be {why}, got {shown!r}")
        if dataclasses.is_dataclass(value) or isinstance(value, list):
            errors += check_limits(value, key)
    return errors
