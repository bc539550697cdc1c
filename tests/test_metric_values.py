"""The numbers behind the logged metrics, checked against their definitions (README.md, "Metrics") on
small hand-built inputs in float64, and the console table's spelling of them."""

from __future__ import annotations

import math

import pytest
import torch

from minigrpo.advantages import group_reward_stats
from minigrpo.metrics_table import COLUMNS, format_row, reward_headers, table_columns

NAN = float("nan")


# ================================================================================================
# reward statistics


def test_mean_group_std_leaves_out_groups_without_a_scored_row():
    """A group whose every reward failed has no spread to measure: it counted as std 0 and lowered
    mean_group_std here (0.4714 instead of 0.7071), as if its completions had been scored alike."""
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, NAN, NAN, 2.0, 2.0, NAN], dtype=torch.float64)
    stats = group_reward_stats(rewards, 3)
    # groups: valid [1, 3] (std sqrt(2)), none, valid [2, 2] (std 0)
    assert stats["mean_group_std"].item() == pytest.approx(math.sqrt(2.0) / 2, abs=1e-12)
    assert stats["group_std"].tolist() == pytest.approx([math.sqrt(2.0), 0.0, 0.0], abs=1e-12)
    assert stats["frac_zero_spread"].item() == pytest.approx(2 / 3, abs=1e-15)  # the empty group has no advantage
    lone = group_reward_stats(torch.tensor([NAN, 5.0, NAN, NAN]), 2)  # one scored row: std 0, like reward/<name>/std
    assert lone["mean_group_std"].item() == 0.0
    assert math.isnan(group_reward_stats(torch.full((4,), NAN), 2)["mean_group_std"].item())  # nothing scored


def test_reward_shares_and_moments_are_logged_in_float64():
    """The statistics were rounded to fp32 before they were logged: one flat group of three gave
    frac_zero_spread 0.3333333432674408, and reward_std lost every digit past the 8th."""
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.1, 0.2, 0.9, 0.3, 0.8, 0.4], dtype=torch.float64)
    stats = group_reward_stats(rewards, 3)
    groups = rewards.view(3, 3)
    assert stats["frac_zero_spread"].item() == 1 / 3
    assert stats["frac_invalid_rows"].item() == 0.0
    assert stats["reward_mean"].item() == pytest.approx(rewards.mean().item(), rel=1e-15)
    assert stats["reward_std"].item() == pytest.approx(rewards.std().item(), rel=1e-14)  # unbiased
    assert stats["mean_group_std"].item() == pytest.approx(groups.std(1).mean().item(), rel=1e-14)
    assert (stats["reward_min"].item(), stats["reward_max"].item()) == (0.1, 0.9)


# ================================================================================================
# the console table


def test_reward_headers_stay_distinct_when_a_number_meets_a_name():
    """Numbering equal headers by position could spell another reward's own name: "a:fn", "b:fn", "c:fn2"
    got the headers fn1, fn2, fn2 (two columns named alike)."""
    heads = reward_headers(["a:fn", "b:fn", "c:fn2"])
    assert heads == ["fn1", "fn3", "fn2"]
    assert reward_headers(["a:fn", "b:fn", "c:fn"]) == ["fn1", "fn2", "fn3"]  # unchanged where nothing meets
    names = [f"m{i}:fn" for i in range(3)] + ["x:fn1", "y:fn3"]
    heads = reward_headers(names)
    assert len(set(heads)) == len(heads) and all(len(h) <= 8 for h in heads), heads


def _cells(values: dict[str, float]) -> dict[str, str]:
    cols = table_columns(list(values), max_width=1000)
    return dict(zip([c.header for c in cols], format_row(cols, values).split(), strict=True))


@pytest.mark.parametrize(("value", "shown"), [(9999.7, "10.0k"), (-9999.7, "-10.0k"), (1234.5, "1234"), (0.5, "0.5")])
def test_values_rounding_up_to_1e4_take_the_si_suffix(value: float, shown: str):
    """Four significant digits of 9999.7 are Python's "1e+04": the kl, gnorm and loss columns printed that
    spelling, unlike the "10.0k" of 10000 itself."""
    cells = _cells({"kl": value, "grad_norm": value, "loss": value})
    assert cells == {"kl": shown, "gnorm": shown, "loss": shown}


@pytest.mark.parametrize(
    ("lr", "shown"), [(0.0, "0"), (1e-6, "1.0e-6"), (3e-5, "3.0e-5"), (2.5e-10, "2.5e-10"), (1e9, "1.0e9")]
)
def test_learning_rates_print_in_one_short_notation(lr: float, shown: str):
    """A warmup starting from 0 printed "0.0e+0", and large rates kept the "+" ("1.0e+9") that the other
    columns drop ("1.0e9")."""
    assert _cells({"lr": lr})["lr"] == shown


@pytest.mark.parametrize("value", [1e-9, -1e-9, 1e9, -1e9, NAN, math.inf, -math.inf, 9999.96, 0.0])
def test_every_column_keeps_its_width(value: float):
    """A row stays aligned under its header whatever the magnitude (NaN and inf as nan / inf / -inf)."""
    keys = [k for c in COLUMNS for k in c.keys]
    cols = table_columns(keys, max_width=1000)
    cells = format_row(cols, dict.fromkeys(keys, value)).split()
    assert [len(t) <= c.width for t, c in zip(cells, cols, strict=True)] == [True] * len(cols), cells
    if not math.isfinite(value):
        assert set(cells) == {"nan" if math.isnan(value) else str(value)}


def test_completion_lengths_of_the_rows_that_ended_are_logged_apart():
    """TRL logs the lengths of the rows that ended on a stop beside all rows': rows of 4, 2, 3 and 1
    tokens, the first one cut at the limit: mean 2.5, min 1, max 4, ended mean 2.0, truncated 1/4."""
    from dataclasses import replace

    from helpers.rollouts import full_rollout

    from minigrpo.distributed import World
    from minigrpo.step import rollout_metrics

    r = full_rollout(2, 2, 3, 4, vocab=50, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(4) < torch.tensor([4, 2, 3, 1])[:, None]).long()  # (N, Tc)
    r = replace(r, completion_mask=mask, loss_mask=mask.float(), truncated=torch.tensor([True, False, False, False]))
    got = rollout_metrics(World(), r, torch.device("cpu"))
    assert (got["completion_len_mean"], got["completion_len_min"], got["completion_len_max"]) == (2.5, 1.0, 4.0)
    assert (got["ended_len_mean"], got["truncated_frac"]) == (2.0, 0.25)
    every_row_cut = rollout_metrics(World(), replace(r, truncated=torch.ones(4, dtype=torch.bool)), torch.device("cpu"))
    assert math.isnan(every_row_cut["ended_len_mean"])
