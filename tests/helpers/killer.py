"""A reward that behaves like `exact_answer` but SIGKILLs its own process on the Nth call when the
environment says so: a crash in the middle of a training step, for the resume test."""

from __future__ import annotations

import os
import signal

from minigrpo.rewards import exact_answer

_calls = 0


def reward(prompts, completions, answers, **columns):
    global _calls
    _calls += 1
    if int(os.environ.get("KILL_ON_CALL", "0")) == _calls:
        os.kill(os.getpid(), signal.SIGKILL)
    return exact_answer(prompts, completions, answers, **columns)
