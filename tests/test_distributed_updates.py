"""Skipped updates under torchrun (two gloo ranks on the CPU): a gradient that is not finite on ONE
rank makes every rank skip the same update (a rank stepping while another skips would leave their
weights apart for good, silently), the counts and the loss scale stay equal to one process's, and a
run of skipped updates stops every rank with its error printed once; in float16 the ranks' losses
overflow at the same loss scale as one process's.

The NaN comes from the loss: this file is also the entry point the ranks run (`python -m
test_distributed_updates`, minigrpo.train with the loss of chosen updates multiplied by NaN on rank
NAN_RANK, and every loss by LOSS_FACTOR)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import cli_env
from safetensors.torch import load_file
from test_distributed import CASES, assert_same_weights, base_config, final_weights, metrics

from minigrpo.grad_scale import MAX_SKIPS_IN_A_ROW


def launch_with_nan(tmp_path: Path, cfg: dict, nproc: int, nan_rank: int, nan_updates: str, loss_factor: float = 1.0):
    """Train `cfg` in `nproc` processes (torchrun when 2) with a NaN loss on rank `nan_rank` in the
    updates `nan_updates` ("2,3", "all", or "" for none) and every loss times `loss_factor`; the
    finished process."""
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "test_distributed_updates", "--config", str(path)]
    env = {
        "OMP_NUM_THREADS": "1",
        "NAN_RANK": str(nan_rank),
        "NAN_UPDATES": nan_updates,
        "LOSS_FACTOR": str(loss_factor),
    }
    env = cli_env(env)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def succeeded(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{' '.join(done.args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.parametrize(
    "case,sections",
    [
        ("fsdp", CASES["fsdp"]),  # sharded gradients: the norm's sum of squares is all-reduced
        # replicated, with a loss scale; Adam's eps 1e-5: a gradient near 0 whose float16 rounding
        # differs with the summation order would otherwise move its weight by a whole lr either way
        ("ddp-float16", {**CASES["ddp"], "run": {"dtype": "float16"}, "train": {"micro_batch_size": 2, "eps": 1e-5}}),
    ],
)
def test_a_nan_on_one_rank_skips_the_same_update_on_every_rank(tmp_path, case, sections):
    """Update 2's loss is NaN on rank 1 only (on the single process's rank 0): two ranks skip it as one
    process does: the same skipped_updates, loss scale and gradient norms, and the same final weights
    (fp32 within test_distributed's TOL; float16 within 1e-3: its rounding of another summation order)."""
    one = succeeded(launch_with_nan(tmp_path, base_config(tmp_path, f"{case}-1", **sections), 1, 0, "2"))
    two = succeeded(launch_with_nan(tmp_path, base_config(tmp_path, f"{case}-2", **sections), 2, 1, "2"))
    assert one.returncode == two.returncode == 0
    m1, m2 = metrics(tmp_path, f"{case}-1"), metrics(tmp_path, f"{case}-2")
    skips = [r.get("skipped_updates", 0) for r in m1]
    assert skips[0] == 0 and skips[1] > 0, f"update 2 was not skipped: {skips}"
    assert [r.get("skipped_updates", 0) for r in m2] == skips
    assert [r.get("loss_scale") for r in m2] == [r.get("loss_scale") for r in m1]
    for r1, r2 in zip(m1, m2):
        if r1["grad_norm"] is None:  # NaN in JSON
            assert r2["grad_norm"] is None, f"step {r1['step']}"
        else:
            assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-3), f"step {r1['step']}"
    start = load_file(tmp_path / "model" / "model.safetensors")
    a, b = final_weights(tmp_path, f"{case}-1"), final_weights(tmp_path, f"{case}-2")
    if "float16" in case:
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        moved = max((a[k].float() - start[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-3 and moved >= 5e-3, f"max |1 - 2 processes| = {worst:.3g}, moved {moved:.3g}"
    else:
        assert_same_weights(a, b, start)


def test_non_finite_updates_in_a_row_stop_every_rank_with_one_error_line(tmp_path):
    """NaN on rank 1 in every update: both ranks skip each one (skipped_updates 1, 2, ... logged by
    rank 0) and both stop at the MAX_SKIPS_IN_A_ROW-th, with the `error:` line printed once (before the
    fix, once per rank: the two lines even ran into each other)."""
    cfg = base_config(tmp_path, "diverged", **CASES["ddp"])
    cfg["train"]["steps"], cfg["log"]["sample_every"] = MAX_SKIPS_IN_A_ROW + 2, 0
    done = launch_with_nan(tmp_path, cfg, 2, 1, "all")
    assert done.returncode != 0
    message = f"error: the last {MAX_SKIPS_IN_A_ROW} updates of the policy all had non-finite gradients"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    logged = [r.get("skipped_updates") for r in metrics(tmp_path, "diverged")]
    assert logged == [float(n) for n in range(1, MAX_SKIPS_IN_A_ROW)]


def test_float16_ranks_overflow_at_the_loss_scale_of_one_process(tmp_path):
    """Every loss times 4, so that float16 backward passes overflow at the first loss scale: one
    process skips an update, halving the scale, until its gradients fit; two ranks skip exactly as many
    and log the same scales. Each rank's backward is that of its rows in one process (its loss is its
    share of the whole batch's and the gradient reduction sums); a loss multiplied by the world size
    for an averaging reduction overflowed at half the scale: one skip more."""
    sections = {
        **CASES["ddp"],
        "run": {"dtype": "float16"},
        "train": {"micro_batch_size": 2, "eps": 1e-5, "steps": 5, "lr": 1e-5},
    }
    runs = {}
    for nproc in (1, 2):
        cfg = base_config(tmp_path, f"scale-{nproc}", **sections)
        succeeded(launch_with_nan(tmp_path, cfg, nproc, 0, "", loss_factor=4.0))
        runs[nproc] = metrics(tmp_path, f"scale-{nproc}")
    skips = [r.get("skipped_updates", 0) for r in runs[1]]  # counted since the start
    assert 0 < skips[-1] < len(runs[1]), f"no overflow to compare: {skips}"
    assert [r.get("skipped_updates", 0) for r in runs[2]] == skips
    assert [r.get("loss_scale") for r in runs[2]] == [r.get("loss_scale") for r in runs[1]]


# ------------------------------------------------------------------------------------------------
# the ranks' entry point


def _nan_loss_training(argv: list[str]) -> None:
    """minigrpo.train whose loss is multiplied by NaN on rank NAN_RANK in the updates NAN_UPDATES, and
    by LOSS_FACTOR everywhere."""
    from minigrpo import step, train

    rank, bad_rank = int(os.environ.get("RANK", "0")), int(os.environ["NAN_RANK"])
    chosen, factor = os.environ["NAN_UPDATES"], float(os.environ.get("LOSS_FACTOR", "1"))
    bad = None if chosen == "all" else {int(u) for u in chosen.split(",") if u}
    updates = [0]
    update_phase, micro_batch_loss = train.update_phase, step.micro_batch_loss

    def counted_update_phase(*args, **kwargs):
        updates[0] += 1
        return update_phase(*args, **kwargs)

    def nan_loss(*args, **kwargs):
        loss, stats = micro_batch_loss(*args, **kwargs)
        loss = loss * factor
        if rank == bad_rank and (bad is None or updates[0] in bad):
            loss = loss * torch.tensor(float("nan"))
        return loss, stats

    train.update_phase, step.micro_batch_loss = counted_update_phase, nan_loss
    train.main(argv)


if __name__ == "__main__":
    _nan_loss_training(sys.argv[1:])
