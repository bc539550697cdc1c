"""The reward-function columns the training loop adds to a data row's own, and the check that no data
column carries one of their names.

Reward functions are called as `fn(prompts, completions, answers, **columns)`, where `columns` are the
row's other fields plus what the loop measured (minigrpo/step.py rollout_phase): a data column named
like one of the loop's would be overwritten before any reward function saw it, and one named like the
three lists would be a second value for that argument (an error at the first scoring, after the
weights load and a whole rollout), so both are refused when the data is read, the column and the data
named. Every rank draws the same prompts, so every rank refuses alike.
"""

from __future__ import annotations

from collections.abc import Iterable

from minigrpo.datafiles import DataError
from minigrpo.episodes import episode_columns

# every call: the three lists every reward function takes first
ARGUMENT_COLUMNS = ("prompts", "completions", "answers")
# every row: the completion's tokens (an episode's: the model's and the tools'), and the most it could have had
ROLLOUT_COLUMNS = ("completion_lengths", "max_completion_length")
# single-turn rows: the conversation the policy saw (data.system_prompt included)
PROMPT_COLUMNS = ("prompt_messages",)
# multi-turn episodes (env:): messages, final_response, num_turns, tool_calls, tool_results, episode_end
EPISODE_COLUMNS = tuple(episode_columns([]))


def loop_columns(*, episodes: bool) -> tuple[str, ...]:
    """The names the loop gives reward functions itself (the three lists and the columns it adds):
    single-turn rows, or with `episodes` the episodes' rows."""
    return ARGUMENT_COLUMNS + ROLLOUT_COLUMNS + (EPISODE_COLUMNS if episodes else PROMPT_COLUMNS)


def data_source(cfg) -> str:
    """The training data as a user names it: the file or repo of data.path, else data.source."""
    return str(cfg.data.path) if cfg.data.path is not None else f"data.source={cfg.data.source}"


def refuse_loop_columns(examples: Iterable, where: str, *, episodes: bool) -> None:
    """Raise DataError if a row of `examples` (data.Example) has a column the loop adds itself."""
    reserved = loop_columns(episodes=episodes)
    for ex in examples:
        clash = next((name for name in reserved if name in ex.columns), None)
        if clash is not None:
            kind = "multi-turn episode" if episodes else "training"
            raise DataError(
                f"{where}: field {clash!r} has the name of a column the {kind} loop gives reward functions "
                f"({', '.join(reserved)}); rename it in the data"
            )
