"""User-style reward functions for the reward tests, resolved by "module:function" path."""

from __future__ import annotations

import time
from typing import Any


def length_ratio(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """len(completion) / 10, None for an empty completion."""
    return [len(c) / 10 if c else None for c in completions]


def always_raises(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    raise RuntimeError("reward service unavailable")


def raises_on_bad(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """1.0 per completion, but raises on the whole call when any completion contains "bad"."""
    if any("bad" in c for c in completions):
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)


def sleeps_on_slow(prompts: list, completions: list[str], answers: list, **_: Any) -> list[float | None]:
    """0.5 per completion; sleeps 2 s when any completion contains "slow"."""
    if any("slow" in c for c in completions):
        time.sleep(2.0)
    return [0.5] * len(completions)


def uses_column(prompts: list, completions: list[str], answers: list, *, difficulty: list, **_: Any) -> list:
    """The dataset column difficulty, as a float."""
    return [float(d) for d in difficulty]


NOT_CALLABLE = 3


def sees_system_prompt(prompts: list, completions: list, answers: list, *, prompt_messages: list, **_: Any) -> list:
    """1.0 where the conversation the policy saw opens with the system message "Be brief.", else 0.0."""
    return [float(m[0] == {"role": "system", "content": "Be brief."}) for m in prompt_messages]
