"""Torchrun jobs (gloo ranks on the CPU) that go wrong on one rank, and the gradient of 3 ranks.

A rank that ends with an error must end the whole job with that error's one line: the other ranks,
whose collectives then break (or time out, distributed.timeout_s, when a rank is stuck), must not
add a traceback each. And the gradient every rank steps with equals the one of a single process on
the same global batch: this file is also the ranks' entry point for that (`python -m
test_distributed_more`: minigrpo.train saving the gradients of each update, as rank 0 holds them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import cli_env
from test_distributed import base_config, launch


def broken_on_rank_1(prompts: list, completions: list[str], answers: list, **_) -> list:
    """len(completion) / 10, but a string per row on rank 1: a broken reward contract there alone."""
    if os.environ.get("RANK") == "1":
        return ["oops"] * len(completions)
    return [len(c) / 10 for c in completions]


def stuck_on_rank_1(prompts: list, completions: list[str], answers: list, **_) -> list:
    """len(completion) / 10, but rank 1 never returns (until torchrun stops it)."""
    if os.environ.get("RANK") == "1":
        time.sleep(600)
    return [len(c) / 10 for c in completions]


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def assert_no_rank_traceback(done: subprocess.CompletedProcess) -> None:
    """No rank printed a traceback (torchrun's own summary of the failed job aside)."""
    rank_lines = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    assert not rank_lines, "a rank printed a traceback:\n" + "\n".join(rank_lines[-15:])
    for echo in ("Connection closed by peer", "Timed out waiting"):
        assert echo not in done.stderr, done.stderr[-3000:]


def test_a_reward_broken_on_one_rank_ends_every_rank_with_its_one_line(tmp_path):
    """Rank 1's reward breaks its contract: its `error:` line, once, and no traceback of rank 0, whose
    gather then breaks (before the fix: 40 lines of gloo's 'Connection closed by peer' from rank 0)."""
    cfg = base_config(
        tmp_path, "broken", rewards=[{"name": "test_distributed_more:broken_on_rank_1"}], distributed={"timeout_s": 10}
    )
    done = launch(tmp_path, cfg, 2)
    assert done.returncode != 0
    assert error_lines(done) == [
        "error: reward 'test_distributed_more:broken_on_rank_1': element 0 is str 'oops', not a number or None"
    ], done.stderr[-3000:]
    assert_no_rank_traceback(done)


def test_a_stuck_rank_ends_the_job_after_the_timeout_with_one_line(tmp_path):
    """Rank 1 never finishes its rewards: after distributed.timeout_s the job ends with one line naming
    the setting (before the fix: rank 0's traceback of gloo's 'Timed out waiting 6000ms')."""
    cfg = base_config(
        tmp_path, "stuck", rewards=[{"name": "test_distributed_more:stuck_on_rank_1"}], distributed={"timeout_s": 6}
    )
    start = time.perf_counter()
    done = launch(tmp_path, cfg, 2)
    assert done.returncode != 0 and time.perf_counter() - start < 120
    errors = error_lines(done)
    assert len(errors) == 1 and "distributed.timeout_s=6 s" in errors[0], done.stderr[-3000:]
    assert_no_rank_traceback(done)


# ------------------------------------------------------------------------------------------------
# the gradient of each update: 3 ranks against one process

GRADIENT_CASES = {
    # FSDP2 full fine-tuning, 4 prompts on 3 ranks (1 + 1 + 2), block checkpointing, dynamic
    # sampling, two updates per batch (old log-probs), a KL term and the batch std
    "fsdp": {
        "model": {"gradient_checkpointing": True},
        "grpo": {
            "prompts_per_step": 4,
            "dynamic_sampling": True,
            "max_resample_rounds": 2,
            "num_iterations": 2,
            "beta": 0.05,
            "scale_rewards": "batch",
        },
        "train": {"steps": 1},
    },
    # LoRA (replicated adapters): only odd answers have a spread, so dynamic sampling leaves the ranks
    # unequal shares, even none; 2-row micro-batches
    "lora": {
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "grpo": {"prompts_per_step": 4, "dynamic_sampling": True, "max_resample_rounds": 2, "loss_type": "grpo"},
        "train": {"steps": 1, "lr": 0.05, "micro_batch_size": 2},
        "rewards": [{"name": "test_distributed:odd_answer_length"}],
    },
}


def update_gradients(tmp_path: Path, cfg: dict, nproc: int) -> list[dict[str, torch.Tensor]]:
    """Train `cfg` in `nproc` processes; the whole gradient of each update, as rank 0 steps with it."""
    name = f"{cfg['run']['name']}-{nproc}"
    path, out = tmp_path / f"{name}.yaml", tmp_path / f"grads-{name}"
    path.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "name": name}}))
    out.mkdir()
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "test_distributed_more", "--config", str(path)]
    env = cli_env({"OMP_NUM_THREADS": "1", "GRADIENTS_TO": str(out)})
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    files = sorted(out.glob("update_*.pt"))
    assert files, "no update was made"
    return [torch.load(f) for f in files]


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_three_ranks_step_with_the_gradient_of_one_process(tmp_path, case):
    """fp32: every trainable parameter's gradient of every update of step 1 within 1e-6 (the
    optimizer's first step hides a wrong scale: Adam's update is about lr * sign(g))."""
    cfg = base_config(tmp_path, case, **GRADIENT_CASES[case])
    one, three = update_gradients(tmp_path, cfg, 1), update_gradients(tmp_path, cfg, 3)
    assert len(one) == len(three) == cfg["grpo"].get("num_iterations", 1)
    for update, (a, b) in enumerate(zip(one, three), 1):
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        largest = max(float(a[k].abs().max()) for k in a)
        assert worst <= 1e-6 and largest > 1e-3, f"update {update}: |1 - 3 ranks| {worst:.3g}, |g| {largest:.3g}"


def _training_saving_gradients(argv: list[str]) -> None:
    """minigrpo.train whose every update first saves the gradient it steps with (GRADIENTS_TO)."""
    from minigrpo import grad_scale, train
    from minigrpo.distributed import full_tensor

    measure, updates, out = grad_scale.global_grad_norm, [0], Path(os.environ["GRADIENTS_TO"])

    def saving_norm(params, scale=1.0):
        updates[0] += 1
        grads = {str(i): full_tensor(p.grad).detach().cpu() for i, p in enumerate(params) if p.grad is not None}
        if os.environ.get("RANK", "0") == "0":
            torch.save(grads, out / f"update_{updates[0]:03d}.pt")
        return measure(params, scale)

    grad_scale.global_grad_norm = saving_norm
    train.main(argv)


if __name__ == "__main__":
    _training_saving_gradients(sys.argv[1:])


def test_sft_under_torchrun_is_refused_in_one_line(tmp_path):
    """SFT runs in one process: under torchrun every rank refused it, the error line printed per rank."""
    cfg = base_config(tmp_path, "sft_ranks")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [sys.executable, *launcher, "-m", "minigrpo.sft", "--config", str(path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True)
    assert done.returncode != 0
    assert error_lines(done) == ["error: python -m minigrpo.sft runs in one process; launch it without torchrun"]
    assert_no_rank_traceback(done)
