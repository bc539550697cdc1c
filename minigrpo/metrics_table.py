"""The console table of a run: which columns, how each value is formatted, one row per printed step.

    cols = table_columns(metric_names)       # the preferred columns present, then per-function rewards
    print(format_header(cols)); print(format_row(cols, values))

Rows stay within MAX_WIDTH characters: the fixed columns come first (the least telling of them left out
when a run logs more than fit), per-function rewards are appended while they fit (all of them are always
in metrics.jsonl and curves.png).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_WIDTH = 140  # characters of one table row
HEADER_EVERY = 20  # table rows between headers
_NOT_PER_FN = ("total", "total_std", "masked_rows")  # reward/<x> keys that are not a reward function


def _short_sci(v: float, digits: int) -> str:
    """Scientific notation without "+" and leading exponent zeros: 1.2e+20 -> "1.2e20", 1e-05 -> "1e-5"."""
    mantissa, exponent = f"{v:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _sci(v: float) -> str:
    """A rate in short scientific notation (1e-06 -> "1.0e-6"); exactly 0 (a warmup's first step) as "0"."""
    return "0" if v == 0 else _short_sci(v, 1)


def si(v: float, digits: int = 1) -> str:
    """A count with an SI suffix: 12345 -> "12.3k", 999999 -> "1.0M" (the suffix is picked after rounding);
    NaN and +-inf as "nan", "inf", "-inf"."""
    if not math.isfinite(v):
        return str(v)
    if abs(round(v)) < 1e4:
        return f"{v:.0f}"
    for scale, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"), (1e15, "P")):
        text = f"{v / scale:.{digits}f}"
        if abs(float(text)) < 1000:
            return text + suffix
    return _short_sci(v, digits)


def fit_number(v: float, width: int) -> str:
    """The most precise spelling of a finite v within `width` characters: fewer decimals first (|v| >= 1),
    then an SI suffix, then short scientific notation; the shortest of them when none fits."""
    candidates = [f"{v:.{d}f}" for d in (3, 2, 1, 0)] if abs(v) >= 1 else []
    candidates += [si(v, 1), si(v, 0)] if abs(v) >= 1e4 else []
    candidates += [_short_sci(v, 1), _short_sci(v, 0)]
    return next((c for c in candidates if len(c) <= width), min(candidates, key=len))


def _g(v: float) -> str:
    """Four significant digits; below 1e-2 in scientific notation, from 1e4 on (after rounding: 9999.7 is
    "10.0k", not "1e+04") with an SI suffix."""
    a = abs(v)
    if a == 0:
        return "0"
    if a < 1e-2:
        return _sci(v)
    text = f"{v:.4g}"
    return si(v) if "e" in text else text


def _pct(v: float) -> str:
    """A fraction as a percentage with one decimal; exactly 100% (after rounding) as "100"."""
    text = f"{100 * v:.1f}"
    return "100" if text == "100.0" else text


def _sec(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _duration(s: float) -> str:
    """Seconds as 45s, 3m07s, 98h00m, 41d16h (from 100 hours on), 1234d (from 100 days on)."""
    s = int(s)
    days, hours = divmod(s // 3600, 24)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 100 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{days}d{hours:02d}h" if days < 100 else f"{days}d" if days < 100_000 else ">99999d"


@dataclass(frozen=True)
class Column:
    """A table column: header, the metric keys it reads (the first one present wins), width, formatter.
    A value the formatter spells wider than the column is shown by fit_number(scale * value, width)
    (scale: what the formatter multiplies by, 100 for percentages), so rows stay aligned."""

    header: str
    keys: tuple[str, ...]
    width: int
    fmt: Callable[[float], str]
    scale: float = 1.0


# The preferred order. "_fail" (summed failures + timeouts) and "_eta" are computed by the logger.
COLUMNS = (
    # 7 digits: every step below 10 million in full (a 6-wide column showed steps 1000000 and 1000001 as "1.0M")
    Column("step", ("step",), 7, lambda v: f"{v:.0f}"),
    Column("reward", ("reward", "reward/total"), 7, lambda v: f"{v:.3f}"),
    Column("r_std", ("reward_std", "reward/total_std"), 6, lambda v: f"{v:.3f}"),
    Column("zero%", ("frac_zero_spread",), 5, _pct, scale=100),
    Column("fail", ("_fail",), 5, lambda v: f"{v:.0f}"),
    Column("len", ("completion_len_mean",), 6, lambda v: f"{v:.0f}"),
    Column("len_max", ("completion_len_max",), 7, lambda v: f"{v:.0f}"),
    Column("trunc%", ("truncated_frac",), 6, _pct, scale=100),
    Column("kl", ("kl", "ppo/kl"), 8, _g),
    Column("clip%", ("clip_region_frac", "ppo/clip_frac"), 5, _pct, scale=100),
    Column("ent", ("entropy",), 6, lambda v: f"{v:.3f}"),
    Column("pairs", ("dpo/pairs",), 5, lambda v: f"{v:.0f}"),  # algorithm: online_dpo
    Column("acc%", ("dpo/accuracy",), 5, _pct, scale=100),
    Column("margin", ("dpo/margin",), 7, _g),
    Column("vloss", ("ppo/value_loss",), 7, _g),  # algorithm: ppo (the critic)
    Column("ev", ("ppo/explained_variance",), 5, lambda v: f"{v:.2f}"),
    Column("gnorm", ("grad_norm",), 6, _g),
    Column("lr", ("lr",), 7, _sci),
    Column("loss", ("loss",), 8, _g),
    Column("tok/s", ("tokens_per_s",), 6, si),
    Column("t_step", ("time/step",), 6, _sec),
    Column("mem", ("mem/peak_gb",), 5, lambda v: f"{v:.1f}"),
    Column("eta", ("_eta",), 7, _duration),
)


# the columns left out, in this order, while the ones a run logs make a row wider than MAX_WIDTH
# (their metrics stay in metrics.jsonl): timings first, the learning rate, which follows a schedule, last
DROPPED_FIRST = ("t_step", "mem", "len_max", "tok/s", "lr")


def _row_width(cols: list[Column]) -> int:
    """Characters of a row of these columns (one space between two)."""
    return sum(c.width + 1 for c in cols) - 1


def reward_function_names(keys: list[str]) -> list[str]:
    """Reward-function names from reward/<name> keys, in first-seen order."""
    return [k[7:] for k in keys if k.startswith("reward/") and "/" not in k[7:] and k[7:] not in _NOT_PER_FN]


def reward_headers(names: list[str]) -> list[str]:
    """Distinct column headers of at most 8 characters for reward-function names: the function's own name
    (`pkg.module:fn` -> fn), cut to 8; names that would share a header keep their first 4 and last 3
    characters ("correctness_strict" -> "corr~ict"), numbered when even those agree."""
    short = [name.rsplit(":", 1)[-1] or name for name in names]
    heads = [n[:8] for n in short]
    heads = [n[:4] + "~" + n[-3:] if len(n) > 8 and heads.count(h) > 1 else h for n, h in zip(short, heads)]
    return _numbered(heads)


def _numbered(heads: list[str]) -> list[str]:
    """Headers that appear more than once numbered by position (fn, fn -> fn1, fn2), each number skipping
    a header already taken, so a numbered one never meets a name of the same spelling ("a:fn", "b:fn",
    "c:fn2" -> fn1, fn3, fn2)."""
    taken = {h for h in heads if heads.count(h) == 1}
    out = []
    for i, head in enumerate(heads):
        if heads.count(head) > 1:
            k = i + 1
            while f"{head[:6]}{k}" in taken:
                k += 1
            head = f"{head[:6]}{k}"
        out.append(head)
        taken.add(head)
    return out


def table_columns(keys: list[str], *, max_width: int = MAX_WIDTH) -> list[Column]:
    """The columns for the metric names seen so far: preferred ones present, then per-function rewards
    (headers from reward_headers) while the row fits in max_width."""
    present = set(keys)
    cols = [c for c in COLUMNS if present.intersection(c.keys)]
    for header in DROPPED_FIRST:  # PPO with groups of several completions logs more than fits
        if _row_width(cols) <= max_width:
            break
        cols = [c for c in cols if c.header != header]
    width = _row_width(cols)
    names = reward_function_names(keys)
    for name, header in zip(names, reward_headers(names)):
        col = Column(header, (f"reward/{name}",), max(len(header), 6), lambda v: f"{v:.3f}")
        if width + 1 + col.width > max_width:
            break
        cols.append(col)
        width += 1 + col.width
    return cols


def format_header(cols: list[Column]) -> str:
    return " ".join(c.header.rjust(c.width) for c in cols)


def format_row(cols: list[Column], values: Mapping[str, float]) -> str:
    """One table row: "-" where a metric is missing this step, "nan" where it was NaN, each value within
    its column's width (see Column)."""
    return " ".join(_cell(c, next((values[k] for k in c.keys if k in values), None)).rjust(c.width) for c in cols)


def _cell(col: Column, v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else str(v)
    text = col.fmt(v)
    return text if len(text) <= col.width else fit_number(col.scale * v, col.width)
