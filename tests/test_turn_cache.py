"""KV-cache reuse across turns (sampling/kv_session.py): a session of the own sampler draws exactly
what a call that prefills every row's whole history draws, while prefilling only the new tokens.

Session level: rows continued over calls with environment tokens of different lengths, rows that
leave, a history that diverges from the cached one, a row that joins, a cache that must regrow,
bucket and check settings, sliding-window models (only new tokens prefilled: windows count tokens)
and a sampler decoding in waves (everything prefilled). Episode level: the same episodes with and
without reuse (tokens equal, log-probs within 1e-5 in fp32), the exact count of prefilled tokens, and
the trainer's log-probs of the built rows.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from test_episodes import ROWS, STOPS, TOK, TalkEnv
from test_sampler import CharTokenizer

from minigrpo.episodes import ENV, episodes_to_rollout, run_episodes
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling import kv_session
from minigrpo.sampling.base import ContinuingSampler, SamplerSession, session_of
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams

LOGP_TOL = 1e-5  # fp32: the same sums over differently padded keys


def same_rollout(a, b) -> None:
    """Token for token equal; sampler log-probs within LOGP_TOL."""
    for name in ("completion_ids", "completion_mask", "truncated", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    err = (a.sampler_logp - b.sampler_logp).abs().max().item()
    assert err < LOGP_TOL, f"sampler log-probs differ by {err:.2e}"
    assert a.completion_texts == b.completion_texts


def continued(prompt: list[int], out, i: int, extra: list[int]) -> list[int]:
    """Row i's next prompt: its prompt, its completion, then `extra` (the environment's tokens)."""
    n = int(out.completion_mask[i].sum())
    return prompt + out.completion_ids[i, :n].tolist() + extra


# ----------------------------------------------------------------------------- the session itself


@pytest.mark.parametrize(
    "kv_bucket,check_every,reserve", [(256, 1, 200), (3, 4, 200), (5, 1, 0)], ids=["default", "buckets", "tight"]
)
def test_a_session_draws_what_generate_draws(kv_bucket, check_every, reserve):
    """Four calls over changing rows; each equals sampler.generate on the whole histories (same key
    and row ids). With room in the cache, prefill_tokens counts exactly the tokens the cache did not
    hold; in a tight cache (no reserve) rows give up a few cached tokens to leave no gaps, and the
    cache regrows only when even that does not fit."""
    model = tiny_model(seed=21)
    sampler = KVCacheSampler(model, CharTokenizer(), kv_bucket=kv_bucket, check_every=check_every)
    assert isinstance(sampler, ContinuingSampler)
    session = sampler.start_session(reserve=reserve)
    assert isinstance(session, SamplerSession)
    params = SamplingParams(temperature=1.0, max_new_tokens=9, stop_ids=(7, 11, 19, 23, 30))
    prompts, ids = [[1, 5, 9, 13, 17], [1, 40, 41], [1, 77, 78, 79], [1, 60]], [10, 11, 12, 13]
    extras = [[50, 51, 52], [], [53] * 9, [54]]  # environment tokens: several, none, many, one
    want_prefill, refed = sum(len(p) for p in prompts), 0.0
    for call in range(4):
        out = session.generate(prompts, params, key=(3, call), row_ids=ids)
        ref = sampler.generate(prompts, params, key=(3, call), row_ids=ids)
        same_rollout(out, ref)
        assert out.stats["prefill_tokens"] + out.stats["reused_tokens"] == sum(len(p) for p in prompts)
        if reserve:
            assert out.stats["prefill_tokens"] == want_prefill, call
        assert out.stats["prefill_tokens"] >= want_prefill, call
        refed += out.stats["prefill_tokens"] - want_prefill
        lengths = out.completion_lengths.tolist()
        nxt = [continued(p, out, i, extras[i % 4]) for i, p in enumerate(prompts)]
        want_prefill = sum(len(e) + 1 for e in extras[: len(nxt)])  # + the last token drawn, never fed
        if call == 0:
            assert len(set(lengths)) > 1 and min(lengths) < 9, lengths  # rows ended at different steps
            nxt, ids, extras = [nxt[0], nxt[2], nxt[3]], [10, 12, 13], [extras[0], extras[2], extras[3]]
            want_prefill = sum(len(e) + 1 for e in extras)  # row 11 left the session
        if call == 1:  # row 12's history diverges 2 tokens before its end; row 99 joins in front
            cut = len(nxt[1]) - len(extras[1]) - 3
            nxt[1][cut] = 90 if nxt[1][cut] != 90 else 91
            want_prefill = len(extras[0]) + 1 + (len(nxt[1]) - cut) + len(extras[2]) + 1 + 3
            nxt, ids, extras = [[1, 2, 3], *nxt], [99, *ids], [[], *extras]
        if call == 2:  # the rows come in the reverse order: moved in place (cycles through a spare row)
            nxt, ids, extras = nxt[::-1], ids[::-1], extras[::-1]
        prompts = nxt
    assert session.stats["calls"] == 4 and (refed > 0) == (reserve == 0)
    # the joining row takes the cache row the leaving one freed and the reversal moves rows in place
    # (its cycles through one spare row): no copy; a tight cache grows on every later call (longer rows)
    assert session.stats["regrowths"] == (0 if reserve else 3)
    session.close()
    assert session.cache is None


WINDOWED = {  # a window on every layer (Mistral), and on the layers past max_window_layers (Qwen2)
    "mistral": lambda w: dict(model_type="mistral", sliding_window=w),
    "qwen2": lambda w: dict(model_type="qwen2", use_sliding_window=True, sliding_window=w, max_window_layers=1),
}


@pytest.mark.parametrize("family", sorted(WINDOWED))
@pytest.mark.parametrize("window", [2, 4])
def test_sliding_windows_count_tokens_so_sessions_prefill_only_new_tokens(family, window):
    """Windows far shorter than a call's slots, rows with gaps of 4, 2 and 0 slots between their kept and
    new tokens: the window counts each row's real tokens, so the session keeps every cached token
    (prefills only the environment's tokens and the last drawn one) and still draws what generate
    draws (tokens equal, log-probs within 1e-5), filters on or off, four turns."""
    prompts, ids = [[1, 5, 9, 13, 17], [1, 40, 41], [1, 77]], [0, 1, 2]
    sampler = KVCacheSampler(tiny_model(seed=22, **WINDOWED[family](window)), CharTokenizer())
    for kw in (dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)):
        params = SamplingParams(max_new_tokens=6, stop_ids=(7, 11, 19), **kw)
        session, p, new = sampler.start_session(reserve=100), prompts, sum(map(len, prompts))
        for call in range(4):
            out = session.generate(p, params, key=(4, call), row_ids=ids)
            same_rollout(out, sampler.generate(p, params, key=(4, call), row_ids=ids))
            assert out.stats["prefill_tokens"] == new, (call, kw)  # no kept token is fed again
            extras = [[60, 61, 62, 63][: 2 * (2 - i)] for i in range(3)]  # 4, 2 and 0 tokens
            p = [continued(q, out, i, extras[i]) for i, q in enumerate(p)]
            new = sum(len(e) + 1 for e in extras)  # + the last token drawn, never fed


def test_waves_prefill_whole_histories():
    """A sampler decoding in waves: whole histories are prefilled, and draw what generate draws."""
    params = SamplingParams(temperature=1.0, max_new_tokens=6, stop_ids=(7, 11, 19))
    prompts, ids = [[1, 5, 9, 13, 17], [1, 40, 41], [1, 77]], [0, 1, 2]
    sampler = KVCacheSampler(tiny_model(seed=22), CharTokenizer(), max_rows=2)
    session = sampler.start_session(reserve=100)
    p = prompts
    for call in range(3):
        out = session.generate(p, params, key=(4, call), row_ids=ids)
        same_rollout(out, sampler.generate(p, params, key=(4, call), row_ids=ids))
        assert out.stats["reused_tokens"] == 0 and out.stats["prefill_tokens"] == sum(map(len, p))
        p = [continued(q, out, i, [60, 61, 62][:i]) for i, q in enumerate(p)]


def test_session_of_falls_back_to_the_sampler():
    class Plain:  # a sampler without sessions (as vLLM)
        def generate(self, *a, **k): ...

    plain = Plain()
    with session_of(plain) as gen:
        assert gen is plain
    sampler = KVCacheSampler(tiny_model(seed=1), CharTokenizer())
    with session_of(sampler, reuse=False) as gen:
        assert gen is sampler
    with session_of(sampler, reserve=32) as gen:
        assert isinstance(gen, kv_session.KVSession) and gen.reserve == 32
        gen.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        assert gen.cache is not None
    assert gen.cache is None  # closed on exit
    with pytest.raises(ValueError, match=r"params\.n must be 1"):
        gen.generate([[1, 2]], SamplingParams(n=2))
    with pytest.raises(ValueError, match="distinct"):
        gen.generate([[1, 2], [3]], SamplingParams(), row_ids=[4, 4])


# ----------------------------------------------------------------------------- whole episodes


ROWS5 = [*ROWS, {"q": "long question?", "turns": 3}, {"q": "z", "turns": 2}]


def play(sampler, temperature: float, reuse: bool, stats: dict):
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=10, stop_ids=STOPS)
    return run_episodes(
        sampler, TOK, TalkEnv(), ROWS5, params, max_turns=3, max_episode_tokens=60, key=(8, 1, 0),
        stats=stats, reuse_cache=reuse,
    )  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_episodes_with_cache_reuse_equal_episodes_prefilled_every_turn(temperature):
    """The same episodes token for token (rows ending at different turns), log-probs within 1e-5;
    reuse prefills the prompts once and after that only each turn's environment tokens plus the
    previous turn's last token; the trainer's log-probs of the built rows equal the sampler's."""
    model = tiny_model(seed=11, vocab_size=TOK.vocab_size, max_position_embeddings=512)
    sampler = KVCacheSampler(model, TOK)
    plain_stats, reuse_stats = {}, {}
    plain = play(sampler, temperature, False, plain_stats)
    reused = play(sampler, temperature, True, reuse_stats)
    assert len({len(e.turns) for e in plain}) == 3 and len({e.end for e in plain}) >= 2
    for a, b in zip(plain, reused):
        assert [(s.owner, s.token_ids) for s in a.segments] == [(s.owner, s.token_ids) for s in b.segments]
        assert a.end == b.end
        for sa, sb in zip(a.segments, b.segments):
            if sa.owner != ENV:
                assert max(abs(x - y) for x, y in zip(sa.logprobs, sb.logprobs)) < LOGP_TOL
    # prefill work: turn 1 the prompts; turn k > 1 the environment segment before it + 1 token
    first = sum(len(e.prompt_ids) for e in reused)
    later = sum(len(s.token_ids) + 1 for e in reused for s in e.segments if s.owner == ENV)
    assert reuse_stats["prefill_tokens"] == first + later
    every_turn = sum(  # without reuse turn k prefills the whole history: the prompt and 2k segments
        len(e.prompt_ids) + sum(len(s.token_ids) for s in e.segments[: 2 * k])
        for e in plain
        for k in range(len(e.turns))
    )
    assert plain_stats["prefill_tokens"] == every_turn and plain_stats["reused_tokens"] == 0
    assert reuse_stats["prefill_tokens"] + reuse_stats["reused_tokens"] == every_turn
    rollout = episodes_to_rollout(reused, TOK, pad_id=sampler.pad_id, group_size=2, stats=reuse_stats)
    assert rollout.stats["prefill_tokens"] == first + later
    with torch.no_grad():
        logp = completion_logprobs(
            model, rollout.input_ids(), rollout.attention_mask(), rollout.loss_mask, temperature=temperature or 1.0
        )
    err = (logp - rollout.sampler_logp).abs().max().item()
    assert err < LOGP_TOL, f"trainer vs sampler log-probs: max |diff| {err:.2e}"


# ----------------------------------------------------------------------------- the memory pre-flight


def test_the_memory_estimate_holds_whole_episodes(monkeypatch):
    """env.kind: a row is an episode of prompt + env.max_episode_tokens tokens, and a turn after the
    longest history spans max_new_tokens more slots. The estimate's KV cache is what a session
    allocates (recorded), where the plain config's is its prompts (shared by each group) + one turn; the
    log-prob and update phases are those of plain rows with max_episode_tokens completions; in waves
    (max_rows < N) the cache is one wave's."""
    from minigrpo.config import load_config
    from minigrpo.memory import estimate_peak
    from minigrpo.memory_parts import kv_cache_bytes
    from minigrpo.models.kv_cache import KVCache

    allocated = []

    class Recording(KVCache):
        def __init__(self, args, batch_size, max_len, **kw):
            allocated.append((batch_size, max_len))
            super().__init__(args, batch_size, max_len, **kw)

    monkeypatch.setattr(kv_session, "KVCache", Recording)
    model = tiny_model(seed=11, vocab_size=TOK.vocab_size, max_position_embeddings=512)
    eps = play(KVCacheSampler(model, TOK), 1.0, True, {})  # 5 rows x 2, 10 tokens a turn, 60 an episode
    Tp = max(len(e.prompt_ids) for e in eps)
    assert allocated == [(10, Tp + 60 + 10)]  # once: the longest row and a turn after it

    def estimate(*overrides):
        base = ["grpo.prompts_per_step=5", "grpo.group_size=2", "sampler.max_new_tokens=10", "run.dtype=float32"]
        cfg = load_config(None, [*base, "train.micro_batch_size=10", *overrides])
        return estimate_peak(cfg, model.args, prompt_tokens=Tp, device_type="cpu")

    episodes = ["env.kind=gsm8k_tools", "env.max_turns=3", "env.max_episode_tokens=60"]
    env, plain, long = estimate(*episodes), estimate(), estimate("sampler.max_new_tokens=60")
    assert env.parts["kv_cache"] == kv_cache_bytes(model.args, *allocated[0], 4)
    assert plain.parts["kv_cache"] == kv_cache_bytes(model.args, 5, Tp, 4) + kv_cache_bytes(model.args, 10, 10, 4)
    for phase in ("logprobs", "update", "optimizer"):
        assert env.phases[phase] == long.phases[phase], phase
    assert env.phases["update"] > plain.phases["update"] and env.total > plain.total
    waves = estimate(*episodes, "sampler.max_rows=4")
    assert waves.parts["kv_cache"] == kv_cache_bytes(model.args, 4, Tp + 60 + 10, 4)


# ----------------------------------------------------------------------------- evaluation


class ReplyEnv:
    """Never done: answers every turn with a tool message holding the turn's number."""

    def __init__(self, system_prompt=None) -> None:
        pass

    def reset(self, row) -> list[dict]:
        return [{"role": "user", "content": row.prompt}]

    def step(self, episode, text: str) -> tuple[list[dict], bool]:
        return [{"role": "tool", "content": str(len(episode.turns)), "name": "lookup"}], False


def turns_reward(prompts, completions, answers, num_turns, **_):
    """The episode's turns (its columns reach the rewards)."""
    return [float(n) for n in num_turns]


def test_eval_plays_episodes_and_reads_the_last_turn(tmp_path, capsys):
    """python -m minigrpo.eval on an env config: greedy episodes of env.max_turns turns (each ends at
    its first digit, a stop string), the accuracy of the LAST turn's answer, rewards on the episode
    columns, and the env/* metrics; the same episodes as run_episodes plays."""
    import json

    import yaml
    from test_env_loop import WORDS, chat_tokenizer

    from minigrpo.answers import extract_answer
    from minigrpo.build import sampling_params
    from minigrpo.config import load_config
    from minigrpo.data import build_dataset
    from minigrpo.env_config import build_environment
    from minigrpo.eval import main as evaluate
    from minigrpo.models.loading import save_pretrained

    model, tok = tiny_model(seed=5, vocab_size=len(WORDS)), chat_tokenizer()
    save_pretrained(model, tok, tmp_path / "model")
    data = tmp_path / "train.jsonl"
    questions = [f"what is the secret ? {d} {d + 1}" for d in range(6)]
    data.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in questions))
    cfg = {
        "run": {"device": "cpu", "output_dir": str(tmp_path / "runs")},
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"source": "jsonl", "path": str(data), "eval_split": None},
        "sampler": {"max_new_tokens": 8, "stop": list("0123456789")},
        "rewards": [{"name": "test_turn_cache:turns_reward"}],
        "env": {"kind": "test_turn_cache:ReplyEnv", "max_turns": 3, "max_episode_tokens": 64},
    }
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "env.yaml")
    examples = build_dataset(loaded.data, "train")
    params = sampling_params(loaded, tok, n=1, temperature=0.0, max_new_tokens=8)
    played = run_episodes(
        KVCacheSampler(model, tok), tok, build_environment(loaded, tok), examples, params, max_turns=3,
        max_episode_tokens=64, reuse_cache=False,
    )  # fmt: skip
    first = [extract_answer(e.turns[0].text) for e in played]
    last = [extract_answer(e.final_text) for e in played]
    assert all(len(e.turns) == 3 for e in played) and first != last and None not in last, (first, last)
    # the reference answers: right for rows 0, 2, 4 (by their last turn), wrong for the others
    answers = [a if i % 2 == 0 else str((int(a) + 1) % 10) for i, a in enumerate(last)]
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers)))
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(tmp_path / "model"), "--config", str(tmp_path / "env.yaml"), "--split", "train"]
    result = evaluate([*args, "--batch-size", "4", "--output", str(out)])
    assert result["accuracy"] == 0.5 and result["num_examples"] == 6
    assert result["reward"] == 3.0 and result["env/turns_mean"] == 3.0 and result["env/done_frac"] == 0.0
    env_tokens = sum(len(s.token_ids) for e in played for s in e.segments if s.owner == ENV) / 6
    assert result["env/env_tokens_mean"] == pytest.approx(env_tokens)
    assert result["env/reused_tokens_mean"] > 0  # the episodes ran through a session
    assert [s["completion"] for s in result["samples"]] == [e.final_text for e in played[:5]]
    assert result["samples"][0]["messages"][-1] == {"role": "tool", "content": "3", "name": "lookup"}
    assert json.loads(out.read_text())["accuracy"] == 0.5
    # a mistake in the env section is one line, before any weights load (these are broken)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (tmp_path / "model").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    args[1] = str(broken)
    with pytest.raises(SystemExit):
        evaluate([*args, "--set", "env.kind=test_turn_cache:Missing"])
    assert "env.kind='test_turn_cache:Missing': 'test_turn_cache' has no 'Missing'" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_session_on_cuda_graphs_draws_what_generate_draws():
    """On CUDA (graph-captured decode steps, the split-K decode kernel reading the gapped key mask):
    three continued calls equal generate's, fp32 log-probs within 1e-5."""
    model = tiny_model(seed=21).cuda()
    sampler = KVCacheSampler(model, CharTokenizer(), kv_bucket=8, check_every=4)
    session = sampler.start_session(reserve=128)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_ids=(7, 11, 19, 23, 30))
    prompts, ids = [[1, 5, 9, 13, 17], [1, 40, 41], [1, 77, 78, 79]], [0, 1, 2]
    for call in range(3):
        out, ref = (f(prompts, params, key=(6, call), row_ids=ids) for f in (session.generate, sampler.generate))
        same_rollout(out, ref)
        assert call == 0 or out.stats["reused_tokens"] > 0
        prompts = [continued(p, out, i, [50, 51, 52][: i + 1]) for i, p in enumerate(prompts)]
