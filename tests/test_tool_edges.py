"""Edges of tool episodes: the length columns the rewards read for an episode, and the python tool's
sandbox (why a run was killed, asyncio allowed, the network still refused)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
from helpers.tiny import tiny_tokenizer

from minigrpo import rewards, step
from minigrpo.config import load_config
from minigrpo.data import Example, PromptLoader
from minigrpo.episodes import ENV, MODEL, Episode, Segment, Turn, episodes_to_rollout
from minigrpo.tools.builtins import sandbox_result
from minigrpo.tools.sandbox import run_python

BUDGET = 20  # env.max_episode_tokens


def scripted_episodes(tokenizer, examples, params):
    """Per row: 6 model tokens, a 10-token tool result, 4 model tokens (20 of 20: the budget used), or
    only 5 model tokens (done early)."""
    episodes = []
    for b, ex in enumerate(examples):
        for j in range(params.n):
            full = j % 2 == 0
            segments = [Segment(MODEL, [4] * 6, [0.0] * 6), Segment(ENV, [5] * 10), Segment(MODEL, [6] * 4, [0.0] * 4)]
            episode = Episode(ex, b * params.n + j, [1, 4], [{"role": "user", "content": ex.prompt}])
            episode.segments = segments if full else [Segment(MODEL, [4] * 5, [0.0] * 5)]
            episode.turns = [Turn("2", stopped=True)] * (2 if full else 1)
            episode.end = "budget" if full else "done"
            episodes.append(episode)
    return episodes


def test_length_penalty_of_a_tool_episode_reaches_its_limit_at_the_episode_budget(monkeypatch):
    """The budget env.max_episode_tokens counts model and tool tokens, so completion_lengths does too:
    an episode of 10 model + 10 tool tokens that used all 20 gets -1 (it read the 10 model tokens only,
    -0.0, and no tool episode could ever reach the limit); a 5-token episode gets 0."""
    cfg = load_config(
        None,
        ["run.device=cpu", "grpo.prompts_per_step=1", "grpo.group_size=2", "train.micro_batch_size=2", "env.kind=tools",
         "env.tools=[calculator]", "sampler.max_new_tokens=10", f"env.max_episode_tokens={BUDGET}"],
    )  # fmt: skip
    tok = tiny_tokenizer()

    def play(cfg, env, sampler, tokenizer, examples, params, *, key, row_ids):
        episodes = scripted_episodes(tokenizer, examples, params)
        return episodes_to_rollout(episodes, tokenizer, pad_id=0, group_size=params.n), episodes

    monkeypatch.setattr(step, "play_episodes", play)
    seen = {}

    def lengths(prompts, completions, answers, *, completion_lengths, max_completion_length, **_):
        seen.update(lengths=completion_lengths, longest=max_completion_length)
        return [0.0] * len(prompts)

    specs = [
        rewards.RewardSpec("length_penalty", fn=rewards.length_penalty, timeout_s=None),
        rewards.RewardSpec("lengths", fn=lengths, timeout_s=None),
    ]
    loader = PromptLoader([Example(prompt="what is 1 + 1", answer="2", columns={})], shuffle=False)
    params = step.SamplingParams(n=2, max_new_tokens=10)
    sampler = SimpleNamespace(pad_id=0)  # play_episodes is scripted: nothing is sampled
    batch = step.rollout_phase(cfg, loader, sampler, tok, specs, params, env=object())
    assert seen == {"lengths": [20, 5], "longest": [BUDGET, BUDGET]}
    assert batch.rewards.tolist() == pytest.approx([-1.0, 0.0], abs=0)


def test_a_sigkill_below_the_cpu_limit_is_not_reported_as_the_cpu_limit():
    """Any SIGKILL (or SIGXCPU) read as "CPU time limit exceeded": here the code kills itself after
    0.02 s of CPU time, far below the 6 s limit. The CPU time used (os.wait4) now decides, and the
    tool's message names the signal; a real CPU-limit stop is still reported as one."""
    killed = run_python("import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (killed.exit_status, killed.cpu_exceeded, killed.stdout) == (-9, False, "bye\n")
    assert 0 < killed.cpu_seconds < 1.0
    result = sandbox_result(killed)
    assert (result.ok, result.error_kind) == (False, "error")
    note = "killed by SIGKILL (not a sandbox limit: the system's out-of-memory killer or the code itself)"
    assert result.content == f"bye\n[{note}]"
    xcpu = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)")
    assert (xcpu.exit_status, xcpu.cpu_exceeded) == (-signal.SIGXCPU, False)
    assert sandbox_result(xcpu).content == "[killed by SIGXCPU]"
    cpu = run_python("while True:\n    pass", timeout_s=30.0, cpu_s=1)
    assert (cpu.exit_status, cpu.cpu_exceeded, cpu.timed_out) == (-signal.SIGXCPU, True, False)
    assert cpu.cpu_seconds >= 0.9
    assert sandbox_result(cpu).content == "[killed: CPU time limit exceeded]"


ASYNC_CODE = """
import asyncio
async def double(x):
    await asyncio.sleep(0.01)
    return 2 * x
async def main():
    return await asyncio.gather(*(double(i) for i in range(3)))
print(asyncio.run(main()))
"""


def test_asyncio_runs_in_the_sandbox():
    """asyncio.run makes a socketpair for its self-pipe, which the network ban refused ("socket.__new__
    is not allowed"): a model's asyncio code could not run at all. AF_UNIX sockets are allowed now."""
    run = run_python(ASYNC_CODE, timeout_s=20.0)
    assert (run.stdout, run.stderr, run.exit_status) == ("[0, 2, 4]\n", "", 0)


NETWORK_CODE = r"""
import os, socket
attempts = {
    "inet": lambda: socket.socket(socket.AF_INET),
    "inet6": lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM),
    "default": lambda: socket.socket(),
    "connect": lambda: socket.socket(socket.AF_UNIX).connect("/run/x.sock"),
    "bind outside": lambda: socket.socket(socket.AF_UNIX).bind("/tmp/x.sock"),
    "bind abstract": lambda: socket.socket(socket.AF_UNIX).bind("\0x"),
    "sendto": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", "/dev/log"),
    "dns": lambda: socket.getaddrinfo("example.com", 80),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "allowed")
    except PermissionError as e:
        print(name, e)
a, b = socket.socketpair()
a.sendall(b"ping")
print(b.recv(4))
socket.socket(socket.AF_UNIX).bind("here.sock")
print(os.path.exists("here.sock"))
"""


def test_the_network_stays_refused_beside_local_sockets():
    """Only AF_UNIX sockets may be made, bound to a path in the working directory, never connected or
    sent to an address: every network socket, connect, outside or abstract bind and lookup is refused."""
    run = run_python(NETWORK_CODE, timeout_s=20.0)
    assert run.exit_status == 0, run.stderr
    assert run.stdout.splitlines() == [
        "inet sandbox: socket.__new__ is not allowed",
        "inet6 sandbox: socket.__new__ is not allowed",
        "default sandbox: socket.__new__ is not allowed",
        "connect sandbox: socket.connect is not allowed",
        "bind outside sandbox: socket.bind is not allowed",
        "bind abstract sandbox: socket.bind is not allowed",
        "sendto sandbox: socket.sendto is not allowed",
        "dns sandbox: socket.getaddrinfo is not allowed",
        "b'ping'",
        "True",
    ]


def test_eval_reads_an_episodes_length_in_the_budgets_unit(monkeypatch):
    """minigrpo.eval scores episodes with the same columns as training: the episode's model and tool
    tokens against env.max_episode_tokens (it passed the model's 10 of 20 tokens: -0.0, not -1)."""
    from helpers.tiny import tiny_model

    from minigrpo import eval as evaluation

    cfg = load_config(
        None,
        ["run.device=cpu", "env.kind=tools", "env.tools=[calculator]", "eval.samples_per_prompt=2",
         "eval.temperature=1.0", "sampler.max_new_tokens=10", f"env.max_episode_tokens={BUDGET}"],
    )  # fmt: skip
    tok = tiny_tokenizer()

    def play(sampler, tokenizer, env, batch, params, *, stats, **_):
        stats.update(prefill_tokens=0.0, reused_tokens=0.0)
        return scripted_episodes(tokenizer, batch, params)

    monkeypatch.setattr(evaluation, "run_episodes", play)
    monkeypatch.setattr(evaluation, "build_environment", lambda cfg, tokenizer: object())  # scripted: unused
    specs = [rewards.RewardSpec("length_penalty", fn=rewards.length_penalty, timeout_s=None)]
    examples = [Example(prompt="what is 1 + 1", answer="2", columns={})]
    result = evaluation.evaluate(cfg, tiny_model(), tok, examples, specs=specs)
    assert result["reward/length_penalty"] == pytest.approx(-0.5, abs=1e-12)  # the mean of -1 and 0


def test_a_str_or_bytes_subclass_does_not_steer_the_sandbox_path_checks(tmp_path):
    """The checks called methods the code can override (a str subclass whose startswith answers False
    passed as inside the folder, a bytes subclass as a non-abstract address) while the system call reads
    the contents: the checks now read a plain copy, and other path-likes come from pathlib only."""
    outside = tmp_path / "escape.txt"
    code = f"""
import socket
class S(str):
    def startswith(self, *a, **k):
        return False
class B(bytes):
    def __getitem__(self, i):
        return b"x"
    def decode(self, *a, **k):
        return "inside.sock"
class P:
    def __fspath__(self):
        return {str(outside)!r}
for attempt in (lambda: open(S({str(outside)!r}), "w"), lambda: socket.socket(socket.AF_UNIX).bind(B(b"\\0x")),
                lambda: open(P(), "w")):
    try:
        attempt()
        print("allowed")
    except PermissionError as e:
        print("refused")
import pathlib
pathlib.Path("ok.txt").write_text("fine")
print(pathlib.Path("ok.txt").read_text())
"""
    result = run_python(code, timeout_s=10.0)
    assert result.stdout.split() == ["refused", "refused", "refused", "fine"], result.stderr
    assert not outside.exists()
