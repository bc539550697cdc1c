"""The learning-rate schedule across a resume: a run continued with more train.steps (the one schedule
setting a resume may change) takes the longer schedule's rates from its first resumed step."""

from __future__ import annotations

import pytest
import torch

from minigrpo.checkpoint import load_trainer_state, save_trainer_state
from minigrpo.config import TrainCfg
from minigrpo.optim import build_optimizer, build_scheduler, lr_factor
from minigrpo.optim_state import load_optimizer_state, optimizer_state


class _Two(torch.nn.Module):
    """A matrix and a vector (two parameter groups under weight decay) in `dtype`."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=g).to(dtype))  # (4, 3)
        self.b = torch.nn.Parameter(torch.randn(4, generator=g).to(dtype))  # (4,)


def _updates(model: _Two, opt, sched, n: int) -> list[list[float]]:
    """n optimizer updates (step, schedule) with fixed gradients; the rates of every group each one used."""
    used = []
    for k in range(n):
        model.w.grad = torch.full_like(model.w, 0.1 * (k + 1))
        model.b.grad = torch.full_like(model.b, -0.2)
        used.append([g["lr"] for g in opt.param_groups])
        opt.step(), sched.step(), opt.zero_grad()
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("schedule", "warmup", "updates"), [("linear", 0, 1), ("cosine", 2, 1), ("linear", 1, 3)])
@pytest.mark.parametrize("saved_at", [4, 2])
def test_a_resume_with_more_steps_takes_the_longer_schedule_from_its_first_step(
    tmp_path, dtype, schedule, warmup, updates, saved_at
):
    """A run of 4 steps saved after `saved_at` of them (the end: its linear decay reached 0 there),
    resumed through the trainer-state files with train.steps=8: every resumed update, the first one
    included, uses exactly the rate a run of 8 steps from the start uses at that update (the first
    resumed update used the 4-step schedule's rate: 0 instead of 0.5 x lr at the end of a linear run)."""
    short = TrainCfg(lr=0.3, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.0, weight_decay=0.1, steps=4)
    model = _Two(dtype)
    opt = build_optimizer(model.parameters(), short)
    sched = build_scheduler(opt, short, 4 * updates, updates)
    _updates(model, opt, sched, saved_at * updates)
    state = {"step": saved_at, "optimizer": optimizer_state(model, opt), "scheduler": sched.state_dict()}
    save_trainer_state(tmp_path, state)

    longer = TrainCfg(**{**vars(short), "steps": 8})
    resumed_model = _Two(dtype, seed=1)
    resumed = build_optimizer(resumed_model.parameters(), longer)
    resumed_sched = build_scheduler(resumed, longer, 8 * updates, updates)
    saved = load_trainer_state(tmp_path)
    load_optimizer_state(resumed_model, resumed, saved["optimizer"])
    resumed_sched.load_state_dict(saved["scheduler"])
    used = _updates(resumed_model, resumed, resumed_sched, (8 - saved_at) * updates)

    fresh = [0.3 * lr_factor(k, longer, 8 * updates, updates) for k in range(saved_at * updates, 8 * updates)]
    assert used == [[lr] * len(resumed.param_groups) for lr in fresh]
    assert resumed_sched.get_last_lr() == [0.0] * len(resumed.param_groups)  # the longer run's end
    if schedule == "linear" and saved_at == 4 and warmup == 0:
        assert used[0] == [0.15, 0.15]  # not the shorter run's end, 0


def test_a_resume_with_more_steps_follows_transformers_linear_schedule():
    """No warmup, linear: the rates of a 5-step run resumed at its end with train.steps=12 equal
    transformers' get_scheduler("linear", 0, 12) at updates 5..11 within 1e-12 (the reference for the
    schedule of a run that was 12 steps long from the start)."""
    from transformers import get_scheduler

    short = TrainCfg(lr=1.0, schedule="linear", steps=5)
    model = _Two(torch.float32)
    opt = build_optimizer(model.parameters(), short)
    sched = build_scheduler(opt, short, 5)
    _updates(model, opt, sched, 5)
    longer = TrainCfg(**{**vars(short), "steps": 12})
    resumed_model = _Two(torch.float32)
    resumed = build_optimizer(resumed_model.parameters(), longer)
    resumed_sched = build_scheduler(resumed, longer, 12)
    load_optimizer_state(resumed_model, resumed, optimizer_state(model, opt))
    resumed_sched.load_state_dict(sched.state_dict())
    ours = [lrs[0] for lrs in _updates(resumed_model, resumed, resumed_sched, 7)]

    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler("linear", ref_opt, num_warmup_steps=0, num_training_steps=12)
    expected = []
    for _ in range(12):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step(), ref.step()
    assert ours == pytest.approx(expected[5:], abs=1e-12)
