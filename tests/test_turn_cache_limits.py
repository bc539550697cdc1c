"""The session cache near the model's position limit and at its other edges (sampling/kv_session.py).

A turn whose rows do not all fit one call under the model's positions goes in several calls
(minigrpo/episode_calls.py); each call holds the rows of the others, so no row prefills its history
again. Against each row played alone: tokens equal, sampler log-probs within 1e-5 (fp32), and the
trainer's log-probs of the built rows within 1e-5 of the sampler's. At the session level: rows held
through calls without them (in place, rows trading places, a cache that regrows), rows of very
different lengths, a prompt the session already holds (nothing new), a history cut back, and the
row moves themselves.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.tiny import tiny_model
from test_episodes import STOPS, TOK
from test_episodes_more import OPENING
from test_sampler import CharTokenizer
from test_turn_cache import WINDOWED, continued, same_rollout

from minigrpo.episodes import ENV, MODEL, episodes_to_rollout, run_episodes
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.kv_session import common_prefix, move_order
from minigrpo.sampling.params import SamplingError, SamplingParams

LOGP_TOL = 1e-5  # fp32: the same sums over differently padded keys
FAMILIES = {"llama": lambda: {}, "mistral": lambda: WINDOWED["mistral"](3), "qwen2": lambda: WINDOWED["qwen2"](4)}


class Answers:
    """Never done: answers turn k with a user message of row["answers"][k] x's (0: an empty message)."""

    def reset(self, row):
        return [{"role": "user", "content": "q"}]

    def step(self, episode, text):
        lengths = episode.row["answers"]
        return [{"role": "user", "content": "x" * lengths[(len(episode.turns) - 1) % len(lengths)]}], False


def same_episodes(a, b) -> None:
    """The same segments and end; the model's log-probs within LOGP_TOL."""
    assert [(s.owner, s.token_ids) for s in a.segments] == [(s.owner, s.token_ids) for s in b.segments]
    assert a.end == b.end
    for sa, sb in zip(a.segments, b.segments):
        if sa.owner == MODEL:
            err = max(abs(x - y) for x, y in zip(sa.logprobs, sb.logprobs))
            assert err < LOGP_TOL, f"sampler log-probs differ by {err:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_turn_split_near_the_position_limit_keeps_every_rows_cache(family):
    """Rows whose environment answered at length have a small turn cap left next to rows with the
    whole max_new_tokens, so a turn goes in two calls (one call would decode the long rows past
    max_position_embeddings). Each call used to drop the other call's rows from the session, and
    their next turn prefilled the whole history again (a row of 66 tokens instead of its 40 new
    ones). Every call now holds the other's rows: prefill is exactly the prompts, then each
    environment segment and the token drawn before it; the episodes are those of each row alone."""
    budget = 48
    model = tiny_model(
        seed=3, vocab_size=TOK.vocab_size, max_position_embeddings=OPENING + budget, **FAMILIES[family]()
    )
    sampler = KVCacheSampler(model, TOK)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, stop_ids=STOPS)
    rows = [{"answers": [20, 2]}, {"answers": [1, 3]}, {"answers": [9, 0, 30]}]
    run = dict(max_turns=4, max_episode_tokens=budget, key=(1, 2, 0))
    stats = {}
    together = run_episodes(sampler, TOK, Answers(), rows, params, stats=stats, **run)
    assert stats["generate_calls"] > max(len(e.turns) for e in together)  # a turn was split
    assert sum(len(e.turns) for e in together) > len(together) + 2  # ... and rows went on after it
    first = sum(len(e.prompt_ids) for e in together)
    later = sum(len(s.token_ids) + 1 for e in together for s in e.segments if s.owner == ENV)
    assert stats["prefill_tokens"] == first + later, (stats["prefill_tokens"], first + later)  # no history twice
    for b, row in enumerate(rows):
        alone = run_episodes(
            sampler, TOK, Answers(), [row], params, row_ids=[2 * b, 2 * b + 1], reuse_cache=False, **run
        )
        for j, episode in enumerate(alone):
            same_episodes(episode, together[2 * b + j])
    rollout = episodes_to_rollout(together, TOK, pad_id=sampler.pad_id, group_size=2)
    with torch.no_grad():
        logp = completion_logprobs(model, rollout.input_ids(), rollout.attention_mask(), rollout.loss_mask)
    err = (logp - rollout.sampler_logp).abs().max().item()
    assert err < LOGP_TOL, f"trainer vs sampler log-probs: max |diff| {err:.2e}"


# ----------------------------------------------------------------------------- the session's rows


class Tracked:
    """A session and, beside it, the tokens each of its rows holds (what a call may skip)."""

    def __init__(self, sampler: KVCacheSampler, reserve: int) -> None:
        self.sampler, self.session, self.held = sampler, sampler.start_session(reserve=reserve), {}

    def call(self, prompts, ids, hold, params, key):
        """One session call, checked against generate on the whole histories; returns it and the
        tokens a call that kept every held token would prefill."""
        want = sum(len(p) - common_prefix(self.held[r], p) if r in self.held else len(p) for r, p in zip(ids, prompts))
        out = self.session.generate(prompts, params, key=key, row_ids=ids, hold=hold)
        same_rollout(out, self.sampler.generate(prompts, params, key=key, row_ids=ids))
        self.held = {r: self.held[r] for r in hold if r in self.held}
        for i, (r, p) in enumerate(zip(ids, prompts)):
            n = int(out.completion_mask[i].sum())
            self.held[r] = p + out.completion_ids[i, : n - 1].tolist()
        return out, want


@pytest.mark.parametrize("reserve", [200, 0], ids=["reserved", "tight"])
def test_held_rows_keep_their_cache_through_calls_without_them(reserve):
    """Rows of 3 to 60 tokens; calls on some of them holding the others, in other orders (held rows
    move up into the call, rows trade places), then a call on one row that holds none: the others
    leave and one that comes back is prefilled whole. Every call equals generate on the whole
    histories; with room in the cache only new tokens are prefilled, rows move in place (no regrowth),
    and a tight cache regrows with its held rows in it."""
    model = tiny_model(seed=31)
    sampler = KVCacheSampler(model, CharTokenizer(), kv_bucket=4, check_every=2)
    rng = random.Random(0)
    prompts = {r: [1] + [rng.randrange(2, 100) for _ in range(n)] for r, n in enumerate([2, 59, 4, 17])}
    params = SamplingParams(temperature=1.0, max_new_tokens=7, stop_ids=(7, 11, 19, 23))
    tracked = Tracked(sampler, reserve)
    calls = [([0, 1, 2, 3], []), ([2, 0], [1, 3]), ([3, 1], [0, 2]), ([1, 0, 3, 2], []), ([0], []), ([2, 0], [])]
    for c, (ids, hold) in enumerate(calls):
        out, want = tracked.call([prompts[r] for r in ids], ids, hold, params, key=(5, c))
        got = out.stats["prefill_tokens"]
        assert got == want if reserve else got >= want, (c, got, want)
        if c == 5:
            assert want == len(prompts[2]) + 1  # row 2 left on call 4: all of it again, row 0 one token
        for i, r in enumerate(ids):
            prompts[r] = continued(prompts[r], out, i, [60 + r] * r)  # 0 to 3 environment tokens
    regrowths = tracked.session.stats["regrowths"]
    assert regrowths == 0 if reserve else regrowths >= 2, regrowths


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_calls_holds_repeats_and_cuts_draw_what_generate_draws(family, seed):
    """Random calls on six rows: random subsets in random orders, random holds, and next prompts that
    go on (0 to 5 environment tokens), repeat the last prompt, equal exactly what the row holds (one
    token to prefill), are cut back or start anew. Every call equals generate on the whole histories
    and prefills exactly the tokens the session did not hold."""
    rng = random.Random(seed)
    model = tiny_model(seed=40 + seed, **FAMILIES[family]())
    sampler = KVCacheSampler(model, CharTokenizer(), kv_bucket=rng.choice([3, 256]), check_every=rng.choice([1, 3]))
    tracked = Tracked(sampler, reserve=250)
    history = {r: [1] + [rng.randrange(2, 100) for _ in range(rng.randrange(0, 30))] for r in range(6)}
    for c in range(6):
        ids = rng.sample(range(6), rng.randrange(1, 7))
        rest = [r for r in range(6) if r not in ids]
        hold = rng.sample(rest, rng.randrange(0, len(rest) + 1))
        params = SamplingParams(temperature=1.0, max_new_tokens=rng.randrange(1, 8), stop_ids=(7, 11, 19))
        out, want = tracked.call([history[r] for r in ids], ids, hold, params, key=(seed, c))
        assert out.stats["prefill_tokens"] == want, c
        for i, r in enumerate(ids):
            how = rng.choice(["go on", "go on", "repeat", "held", "cut", "anew"])
            if how == "go on":
                history[r] = continued(history[r], out, i, [rng.randrange(2, 100) for _ in range(rng.randrange(6))])
            elif how == "held":
                history[r] = list(tracked.held[r])
            elif how == "cut":
                history[r] = history[r][: max(1, len(history[r]) - rng.randrange(4))]
            elif how == "anew":
                history[r] = [1, rng.randrange(2, 100)]


def test_a_prompt_the_session_holds_whole_prefills_one_token():
    """A call on exactly the tokens a row's cache holds (nothing new: the last drawn token dropped)
    feeds the last of them again (its logits make the first draw) and draws what generate draws."""
    sampler = KVCacheSampler(tiny_model(seed=8), CharTokenizer())
    tracked = Tracked(sampler, reserve=64)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, stop_ids=(7,))
    prompts = [[1, 5, 9], [1, 40, 41, 42, 43]]
    tracked.call(prompts, [0, 1], [], params, key=(0,))
    out, want = tracked.call([tracked.held[0], tracked.held[1]], [0, 1], [], params, key=(1,))
    assert out.stats["prefill_tokens"] == want == 2


def test_held_rows_are_checked_and_bounded_by_max_rows():
    """hold naming a row of the call, or a row twice, is a SamplingError; with max_rows a call holds
    rows only up to max_rows rows in all (the others leave, and come back prefilled whole), and
    every call draws what generate draws."""
    sampler = KVCacheSampler(tiny_model(seed=9), CharTokenizer(), max_rows=2)
    tracked = Tracked(sampler, reserve=64)
    params = SamplingParams(temperature=1.0, max_new_tokens=4, stop_ids=(7,))
    with pytest.raises(SamplingError, match=r"hold must name distinct rows outside row_ids \[0\], got \[0\]"):
        tracked.session.generate([[1, 2]], params, row_ids=[0], hold=[0])
    with pytest.raises(SamplingError, match=r"got \[1, 1\]"):
        tracked.session.generate([[1, 2]], params, row_ids=[0], hold=[1, 1])
    prompts = {0: [1, 5, 9], 1: [1, 40, 41], 2: [1, 77, 78, 79]}
    for c, (ids, hold) in enumerate([([0, 1], []), ([0], [1]), ([1, 2], [0]), ([0], [1, 2])]):
        out, want = tracked.call([prompts[r] for r in ids], ids, hold, params, key=(c,))
        if c == 2:  # two rows decode: row 0 cannot stay
            assert tracked.session.row_ids == [1, 2]
            tracked.held.pop(0)
        if c == 3:
            assert want == out.stats["prefill_tokens"] == len(prompts[0])  # all of it again
        else:
            assert out.stats["prefill_tokens"] == want, c
        for i, r in enumerate(ids):
            prompts[r] = continued(prompts[r], out, i, [50])


@pytest.mark.parametrize("seed", range(4))
def test_move_order_never_overwrites_a_row_before_it_is_read(seed):
    """Random moves among eight rows (chains, cycles, rows that stay): carried out in move_order's
    order through one spare, every target ends with its source's contents; chains need no spare."""
    rng = random.Random(seed)
    targets = rng.sample(range(8), rng.randrange(1, 9))
    moves = dict(zip(targets, rng.sample(range(8), len(targets))))
    rows, spare = [f"row{i}" for i in range(8)], None
    for target, source in move_order(moves):
        if target is None:
            spare = rows[source]
        else:
            rows[target] = spare if source is None else rows[source]
    assert all(rows[t] == f"row{s}" for t, s in moves.items())
    chain = {1: 2, 2: 3, 3: 4}  # 1 <- 2 <- 3 <- 4: row 1 first
    assert move_order(chain) == [(1, 2), (2, 3), (3, 4)]
    assert move_order({0: 1, 1: 0}) == [(None, 0), (0, 1), (1, None)]
