"""One process per run folder: a second `python -m minigrpo.train` (or --resume) on a folder a running
process holds is one line naming that process's pid, before anything is loaded or written, and the
first runs on untouched; a run killed with SIGKILL leaves no lock behind, so its --resume is accepted.
And a --resume names only the settings the user changed, not the values derived from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.cli import cli_env
from helpers.runs import launch, run_config

from minigrpo.errors import UserError
from minigrpo.rewards import exact_answer
from minigrpo.run_folder import run_dir_held

_calls = 0


def gated(prompts, completions, answers, **columns):
    """`exact_answer` that, on the call GATE_ON_CALL, writes GATE_DIR/waiting and waits for GATE_DIR/go:
    a run held in the middle of a step for as long as a test needs."""
    global _calls
    _calls += 1
    gate = os.environ.get("GATE_DIR")
    if gate and int(os.environ.get("GATE_ON_CALL", "0")) == _calls:
        (Path(gate) / "waiting").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not (Path(gate) / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.05)
    return exact_answer(prompts, completions, answers, **columns)


def start_gated(tmp_path: Path, cfg: dict, on_call: int, *extra: str) -> subprocess.Popen:
    """`python -m minigrpo.train` on cfg in a child process, waiting in the reward of its call `on_call`."""
    gate = tmp_path / f"gate_{len(list(tmp_path.glob('gate_*')))}"
    gate.mkdir()
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = cli_env({"GATE_DIR": str(gate), "GATE_ON_CALL": str(on_call)})
    cmd = [sys.executable, "-m", "minigrpo.train", "--config", str(path), *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (gate / "waiting").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1]
            pytest.fail(f"the first run never reached its gate (exit status {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.1)
    proc.gate = gate
    return proc


def refusal(tmp_path: Path, cfg: dict, capsys, *extra: str) -> str:
    """The one error line of an in-process `python -m minigrpo.train` on cfg (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, cfg, *extra)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def steps_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_in_a_held_folder_is_refused_and_a_killed_run_resumes(tmp_path, monkeypatch, capsys):
    """A runs (waiting inside step 2, its step-1 checkpoint written); a new run and a --resume in the same
    folder are refused with A's pid before any weights load; A then finishes its 3 steps alone (one
    record per step, no temporary checkpoint left). A --resume killed with SIGKILL mid-step leaves the
    folder free: the next --resume runs the missing steps."""
    import minigrpo.train  # noqa: F401  (imported first: it binds build.load_policy, patched below)
    from minigrpo import build

    cfg = run_config(
        tmp_path,
        rewards=[{"name": "test_run_folder_lock:gated"}],
        train={"steps": 3},
        checkpoint={"every": 1, "save_final": True},
    )
    run_dir = tmp_path / "runs" / "run"
    first = start_gated(tmp_path, cfg, on_call=2)
    try:
        loaded = []
        monkeypatch.setattr(build, "load_policy", lambda *a, **k: loaded.append(1) or pytest.fail("weights loaded"))
        expected = (
            f"error: {run_dir} is in use by another run (pid {first.pid} holds {run_dir / '.lock'}): wait for it "
            "to end, or set another run.name"
        )
        assert refusal(tmp_path, cfg, capsys) == expected
        assert refusal(tmp_path, cfg, capsys, "--resume") == expected
        assert not loaded
        monkeypatch.undo()

        (first.gate / "go").touch()
        err = first.communicate(timeout=240)[1]
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert steps_of(run_dir) == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000003"]  # keep_last 2
    assert not (run_dir / ".lock").exists()  # a run that ends removes its lock file

    longer = {**cfg, "train": {**cfg["train"], "steps": 5}}
    killed = start_gated(tmp_path, longer, 2, "--resume")  # inside step 5, step 4's checkpoint written
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert (run_dir / ".lock").read_text().strip() == str(killed.pid)  # stale: its lock died with it
    capsys.readouterr()
    records = launch(tmp_path, longer, "--resume")
    assert [r["step"] for r in records][-2:] == [4, 5] and steps_of(run_dir)[-1] == 5


def test_only_rank_0_takes_the_lock_under_torchrun(tmp_path, monkeypatch):
    """Rank 0 holds the folder; another rank of the same job (RANK=1) takes no lock, so it neither
    waits for nor is refused by its rank 0, and leaves no lock file."""
    from minigrpo.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path)))
    cfg = load_config(path)
    with run_dir_held(cfg) as held:
        assert held is not None and (cfg.run.run_dir / ".lock").read_text().strip() == str(os.getpid())
        monkeypatch.setenv("RANK", "1")
        with run_dir_held(cfg) as other:
            assert other is None
        monkeypatch.setenv("RANK", "0")
        in_use = rf"is in use by another run \(pid {os.getpid()} holds "
        with pytest.raises(UserError, match=in_use), run_dir_held(cfg):
            pass
    assert not cfg.run.run_dir.exists()  # made for the lock, left empty: removed with it


def test_sft_refuses_a_folder_another_run_holds(tmp_path, capsys):
    """python -m minigrpo.sft in a folder held by another open lock (flock: any other open file, this
    process's too) is one line naming the holder's pid, exit status 2, and writes nothing there."""
    from test_sft import format_task, sft_config

    from minigrpo.config import load_config
    from minigrpo.sft import main

    format_task(tmp_path, n=8)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(sft_config(tmp_path, train={"steps": 1})))
    cfg = load_config(path)
    run_dir = cfg.run.run_dir
    with run_dir_held(cfg):
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(path)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {run_dir} is in use by another run (pid {os.getpid()} holds {run_dir / '.lock'}): wait for it "
            "to end, or set another run.name"
        )
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_a_new_run_refused_by_a_check_leaves_no_folder(tmp_path, capsys):
    """The folder made to hold the lock is removed when a check refuses the run before it wrote anything."""
    cfg = run_config(tmp_path, rewards=[{"name": "no_such_reward"}])
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, cfg)
    assert exit_info.value.code == 2 and "no_such_reward" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# what a resume names as changed


@pytest.fixture
def checkpointed(tmp_path) -> tuple[dict, Path]:
    """A one-step run with its checkpoint (sampler.max_new_tokens=1, env.kind null): its config and
    the checkpoint's run_config.yaml."""
    cfg = run_config(tmp_path, train={"steps": 1}, checkpoint={"every": 1})
    launch(tmp_path, cfg)
    return cfg, tmp_path / "runs" / "run" / "checkpoints" / "step_000001" / "run_config.yaml"


def resume_error(tmp_path: Path, cfg: dict, *overrides: str) -> str | None:
    """check_run_dir's refusal of a --resume of cfg at 2 steps with `overrides` (None: accepted)."""
    from minigrpo.build import check_run_dir, resumable_changes
    from minigrpo.config import load_config

    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "steps": 2}}))
    resumed = load_config(path, ["run.resume=true", *overrides])
    try:
        check_run_dir(resumed, resumable_changes(resumed))
    except UserError as e:
        return str(e)
    return None


def test_a_resume_names_the_changed_key_not_the_values_derived_from_it(tmp_path, checkpointed):
    """sampler.max_new_tokens changed: that key alone (env.max_episode_tokens and eval.max_new_tokens
    follow it); grpo.epsilon changed: not also grpo.epsilon_high; env.max_turns with env.kind null on
    both sides is read by nothing: no change; a derived value set away from its derivation is named."""
    cfg, _ = checkpointed
    changed = "--resume with a changed config: {} from "
    assert resume_error(tmp_path, cfg, "sampler.max_new_tokens=2").startswith(
        changed.format("sampler.max_new_tokens differs")
    )
    assert resume_error(tmp_path, cfg, "grpo.epsilon=0.3").startswith(changed.format("grpo.epsilon differs"))
    assert resume_error(tmp_path, cfg, "env.max_turns=3") is None
    assert resume_error(tmp_path, cfg, "grpo.epsilon_high=0.5").startswith(changed.format("grpo.epsilon_high differs"))


@pytest.mark.parametrize("saved_as", ["missing", "null"])
def test_a_checkpoint_without_the_derived_episode_budget_resumes(tmp_path, checkpointed, saved_as):
    """A run_config.yaml written before env.max_episode_tokens was derived (no such key, or null) with
    env.kind null: neither config sets it, so the resume is accepted; a real change is still named alone."""
    cfg, saved_file = checkpointed
    saved = yaml.safe_load(saved_file.read_text())
    if saved_as == "missing":
        del saved["env"]["max_episode_tokens"]
    else:
        saved["env"]["max_episode_tokens"] = None
    saved_file.write_text(yaml.safe_dump(saved))
    assert resume_error(tmp_path, cfg) is None
    assert resume_error(tmp_path, cfg, "train.lr=0.01").startswith("--resume with a changed config: train.lr differs")
