"""The console table of a run: which columns, how each value is formatted, one row per printed step.

    cols = table_columns(metric_names)       # the preferred columns present, then per-function rewards
    print(format_header(cols)); print(format_row(cols, values))

Rows stay within MAX_WIDTH characters: the fixed columns come first, per-function rewards are appended
while they fit (all of them are always in metrics.jsonl and curves.png).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_WIDTH = 140  # characters of one table row
HEADER_EVERY = 20  # table rows between headers
_NOT_PER_FN = ("total", "total_std", "masked_rows")  # reward/<x> keys that are not a reward function


def _sci(v: float) -> str:
    return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def si(v: float) -> str:
    """A count with an SI suffix: 12345 -> "12.3k"."""
    a = abs(v)
    if a < 1e4:
        return f"{v:.0f}"
    scale, suffix = next((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if a >= s)
    return f"{v / scale:.1f}{suffix}"


def _g(v: float) -> str:
    a = abs(v)
    return "0" if a == 0 else si(v) if a >= 1e4 else _sci(v) if a < 1e-2 else f"{v:.4g}"


def _pct(v: float) -> str:
    return "100" if v >= 0.9995 else f"{100 * v:.1f}"


def _sec(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass(frozen=True)
class Column:
    """A table column: header, the metric keys it reads (the first one present wins), width, formatter."""

    header: str
    keys: tuple[str, ...]
    width: int
    fmt: Callable[[float], str]


# The preferred order. "_fail" (summed failures + timeouts) and "_eta" are computed by the logger.
COLUMNS = (
    Column("step", ("step",), 6, lambda v: f"{v:.0f}"),
    Column("reward", ("reward", "reward/total"), 7, lambda v: f"{v:.3f}"),
    Column("r_std", ("reward_std", "reward/total_std"), 6, lambda v: f"{v:.3f}"),
    Column("zero%", ("frac_zero_spread",), 5, _pct),
    Column("fail", ("_fail",), 4, lambda v: f"{v:.0f}"),
    Column("len", ("completion_len_mean",), 6, lambda v: f"{v:.0f}"),
    Column("len_max", ("completion_len_max",), 7, lambda v: f"{v:.0f}"),
    Column("trunc%", ("truncated_frac",), 6, _pct),
    Column("kl", ("kl", "ppo/kl"), 8, _g),
    Column("clip%", ("clip_region_frac", "ppo/clip_frac"), 5, _pct),
    Column("ent", ("entropy",), 6, lambda v: f"{v:.3f}"),
    Column("pairs", ("dpo/pairs",), 5, lambda v: f"{v:.0f}"),  # algorithm: online_dpo
    Column("acc%", ("dpo/accuracy",), 5, _pct),
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


def reward_function_names(keys: list[str]) -> list[str]:
    """Reward-function names from reward/<name> keys, in first-seen order."""
    return [k[7:] for k in keys if k.startswith("reward/") and "/" not in k[7:] and k[7:] not in _NOT_PER_FN]


def table_columns(keys: list[str], *, max_width: int = MAX_WIDTH) -> list[Column]:
    """The columns for the metric names seen so far: preferred ones present, then per-function rewards
    (header = the name, cut to 8 characters) while the row fits in max_width."""
    present = set(keys)
    cols = [c for c in COLUMNS if present.intersection(c.keys)]
    width = sum(c.width + 1 for c in cols) - 1
    for name in reward_function_names(keys):
        col = Column(name[:8], (f"reward/{name}",), max(len(name[:8]), 6), lambda v: f"{v:.3f}")
        if width + 1 + col.width > max_width:
            break
        cols.append(col)
        width += 1 + col.width
    return cols


def format_header(cols: list[Column]) -> str:
    return " ".join(c.header.rjust(c.width) for c in cols)


def format_row(cols: list[Column], values: Mapping[str, float]) -> str:
    """One table row: "-" where a metric is missing this step, "nan" where it was NaN."""
    out = []
    for c in cols:
        v = next((values[k] for k in c.keys if k in values), None)
        s = "-" if v is None else "nan" if math.isnan(v) else c.fmt(v) if math.isfinite(v) else str(v)
        out.append(s.rjust(c.width))
    return " ".join(out)
