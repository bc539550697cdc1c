"""How the live episodes of one turn become the sampler's generate calls (run_episodes, episodes.py).

A call decodes every row up to its largest turn cap, so a turn goes in one call wherever that stays
within the model's positions and in several otherwise (`call_groups`). When a turn is split, each
call to a session holds the rows of its other calls (`hold_rows`): their KV caches stay for their
own call of this turn instead of leaving the session, which would prefill their whole history again.
"""

from __future__ import annotations

from typing import Any

from minigrpo.prompt_fit import position_limit
from minigrpo.sampling.rollout import Rollout


def call_groups(lengths: list[int], caps: list[int], limit: int | None) -> list[list[int]]:
    """The live rows (their histories' `lengths` and turn `caps`) split into the turn's generate calls.
    A call decodes every row up to its largest cap: a row with a long history and a small cap left
    decodes past its own budget, and the call spans its history plus the largest cap. Past the model's
    position `limit` that is refused (a longrope switch) or rotates the whole batch differently
    (dynamic NTK), so the rows go in calls that stay within it (one call wherever it fits, or no limit);
    each row alone fits (the config checks prompt + max_episode_tokens against the limit)."""
    rest, groups = sorted(range(len(caps)), key=lambda i: -caps[i]), []
    while rest:
        cap = caps[rest[0]]  # the largest left: its row comes first
        fits = [i for i in rest[1:] if limit is None or lengths[i] + cap <= limit]
        groups.append(sorted([rest[0], *fits]))
        rest = [i for i in rest[1:] if i not in fits]
    return groups


def call_position_limit(sampler: Any) -> int | None:
    """The positions a call may span on the own sampler's model (prompt_fit.position_limit); None for
    another sampler (vLLM's max_model_len holds the longest prompt, the budget and one more turn)."""
    args = getattr(getattr(sampler, "model", None), "args", None)
    return None if args is None else position_limit(args).positions


def hold_rows(is_session: bool, others: list[int]) -> dict[str, list[int]]:
    """The generate keywords that keep the rows `others` (row ids of the turn's other calls, still
    live) in a session while this call runs without them; nothing for a plain sampler."""
    return {"hold": others} if is_session else {}


def row_turn(out: Rollout, i: int, cap: int) -> tuple[list[int], list[float], bool]:
    """(tokens, log-probs, stopped) of row i of a turn's rollout, cut to the row's own `cap`: the same
    tokens as sampling only `cap` (a row's noise does not depend on the call's max_new_tokens)."""
    n = int(out.completion_mask[i].sum())
    toks, logp = out.completion_ids[i, :n].tolist(), out.sampler_logp[i, :n].tolist()
    if n > cap:
        return toks[:cap], logp[:cap], False
    return toks, logp, not bool(out.truncated[i])
