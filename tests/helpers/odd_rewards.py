"""Reward functions that misbehave in ways a user's might, for the CLI tests."""

from __future__ import annotations

from typing import Any


def all_nan(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float]:
    """NaN for every row: nothing is scored."""
    return [float("nan")] * len(completions)
