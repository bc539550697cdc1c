"""Multi-turn episodes on inputs beyond tests/test_episodes.py: turn budgets that differ between rows."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from test_episodes import IM_END, STOPS, TOK

from minigrpo.episodes import run_episodes
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams


class EchoLength:
    """Answers every turn with a user message of row["answer"] x's; never done."""

    def reset(self, row):
        return [{"role": "user", "content": "q"}]

    def step(self, episode, text):
        return [{"role": "user", "content": "x" * episode.row["answer"]}], False


class RecordingSampler(KVCacheSampler):
    """The own sampler, recording each call's longest prompt and max_new_tokens (a session's too)."""

    spans: list[tuple[int, int]]

    def check_call(self, prompts, params):
        self.spans.append((max(map(len, prompts)), params.max_new_tokens))
        super().check_call(prompts, params)


OPENING = len(TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True)))


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_a_long_history_never_decodes_past_a_longrope_switch(reuse_cache):
    """A row whose environment answered at length has a small turn cap left while another row still
    has max_new_tokens: one call for both would decode the long row up to the other's cap, past the
    model's longrope switch (set at opening prompt + max_episode_tokens, which the config allows), and
    the sampler refused the whole turn. Each call now spans at most the opening prompt plus the budget,
    and each row plays the episode it plays alone."""
    budget, turn = 48, 12
    longrope = dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    model = tiny_model(
        seed=3, model_type="phi3", vocab_size=TOK.vocab_size, max_position_embeddings=256,
        original_max_position_embeddings=OPENING + budget, rope_scaling=longrope,
    )  # fmt: skip
    sampler = RecordingSampler(model, TOK)
    sampler.spans = []
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=turn, stop_ids=STOPS)
    rows, run = [{"answer": 20}, {"answer": 1}], dict(max_turns=4, max_episode_tokens=budget, key=(1, 0, 0))
    stats = {}
    together = run_episodes(sampler, TOK, EchoLength(), rows, params, stats=stats, reuse_cache=reuse_cache, **run)
    assert stats["generate_calls"] > max(len(e.turns) for e in together)  # a turn was split
    assert max(p + t for p, t in sampler.spans) <= OPENING + budget, sampler.spans
    assert all(e.num_tokens <= budget for e in together)
    for b, row in enumerate(rows):
        (alone,) = run_episodes(sampler, TOK, EchoLength(), [row], params, row_ids=[b], **run)
        assert [(s.owner, s.token_ids) for s in alone.segments] == [
            (s.owner, s.token_ids) for s in together[b].segments
        ]
        assert alone.end == together[b].end


# ----------------------------------------------------------------------------- a user environment's contract


class Returns:
    """A user environment whose reset() and step() return the given values."""

    def __init__(self, opening, answer):
        self.opening, self.answer = opening, answer

    def reset(self, row):
        return self.opening

    def step(self, episode, text):
        return self.answer


HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("opening", "answer", "error"),
    [
        ("hi", ([], True), r"^Returns\.reset\(\) returned a str 'hi'; expected a list of message dicts$"),
        (HELLO[0], ([], True), r"^Returns\.reset\(\) returned a dict .*; expected a list of message dicts$"),
        ([{"content": "hi"}], ([], True), r"^Returns\.reset\(\) returned message 0 = a dict .* \(no 'role' string\)"),
        (HELLO, HELLO, r"^Returns\.step\(\) returned a list .*; expected a tuple \(messages, done\)$"),
        (HELLO, ("more", False), r"^Returns\.step\(\) returned a str 'more'; expected a list of message dicts$"),
        (HELLO, (HELLO, "no"), r"^Returns\.step\(\) returned done=a str 'no'; expected True or False$"),
        (HELLO, ([{"role": "user", "content": 5}], False), r"^Returns\.step\(\) returned message 0 with content a"),
    ],
)
def test_an_environment_that_breaks_its_contract_is_one_line(opening, answer, error):
    """What reset() and step() return is checked: a string or one dict is no message list (it was
    spread into characters or keys: "chat messages must be dicts, got str: 'm'"), a step() without
    `done` failed to unpack, and done="no" ended the episode silently. Each is now one line naming the
    method, and the run's error type (a UserError)."""
    from test_episodes import ScriptedSampler

    from minigrpo.episodes import EnvironmentContractError
    from minigrpo.errors import UserError

    sampler = ScriptedSampler({0: ["a", "b"]})
    params = SamplingParams(n=1, max_new_tokens=5)
    with pytest.raises(EnvironmentContractError, match=error) as info:
        run_episodes(sampler, TOK, Returns(opening, answer), [{}], params, max_turns=2, max_episode_tokens=40, key=(0,))
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_an_environment_may_answer_with_numpy_or_torch_bools_and_tuples_of_messages():
    """done as a numpy / torch bool (an environment computing it from arrays) and messages as a tuple
    play as a bool and a list."""
    import numpy as np
    import torch
    from test_episodes import ScriptedSampler

    for done in (np.bool_(True), torch.tensor(True)):
        sampler = ScriptedSampler({0: ["a", "b"]})
        env = Returns(tuple(HELLO), (({"role": "user", "content": "ok"},), done))
        params = SamplingParams(n=1, max_new_tokens=5, stop_ids=(IM_END,))
        (e,) = run_episodes(sampler, TOK, env, [{}], params, max_turns=2, max_episode_tokens=40, key=(0,))
        assert e.end == "done" and len(e.turns) == 1
        assert e.messages == [*HELLO, {"role": "assistant", "content": "a"}, {"role": "user", "content": "ok"}]


def test_a_row_decoding_past_its_budget_leaves_dynamic_ntk_alone():
    """Dynamic NTK picks its frequencies per forward from the batch's largest position: a row decoding
    past its own budget (to another row's cap) beyond max_position_embeddings rotated the other rows'
    tokens of those steps differently, and their sampler log-probs parted from the trainer's (by
    0.0087 here), silently. The call is now split: every row's log-probs equal the trainer's (1e-5)."""
    from minigrpo.episodes import episodes_to_rollout
    from minigrpo.logprobs import completion_logprobs

    budget = 48
    dynamic = {"type": "dynamic", "factor": 4.0}
    model = tiny_model(
        seed=3, vocab_size=TOK.vocab_size, max_position_embeddings=OPENING + budget, rope_scaling=dynamic
    )
    sampler = KVCacheSampler(model, TOK)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=12, stop_ids=STOPS)
    rows = [{"answer": 20}, {"answer": 1}]
    stats = {}
    eps = run_episodes(sampler, TOK, EchoLength(), rows, params, max_turns=4, max_episode_tokens=budget, key=(0, 0, 0),
                       stats=stats)  # fmt: skip
    assert stats["generate_calls"] == 3 and [len(e.turns) for e in eps] == [2, 2]  # the second turn split
    rollout = episodes_to_rollout(eps, TOK, pad_id=sampler.pad_id)
    with torch.no_grad():
        logp = completion_logprobs(model, rollout.input_ids(), rollout.attention_mask(), rollout.loss_mask)
    err = (logp - rollout.sampler_logp).abs().max().item()
    assert err < 1e-5, f"trainer vs sampler log-probs: max |diff| {err:.2e}"
