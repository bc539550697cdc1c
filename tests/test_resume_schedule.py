"""The learning rate across a resume that changes train.steps (the one schedule setting a resume may
change): a linear or cosine decay is rebuilt over the new length, so the first resumed step runs at
another rate than the saved schedule gave it, and the resume says so in one note line naming both; the
other settings of the curve (lr, warmup, schedule, the floor of a decay) are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.runs import launch, run_config
from helpers.tiny import tiny_model

from minigrpo.checkpoint import save_checkpoint
from minigrpo.config import Config, TrainCfg
from minigrpo.errors import UserError
from minigrpo.optim import build_optimizer, build_scheduler, lr_factor, resumed_rate_note
from minigrpo.run_folder import check_run_dir, resumable_changes


def _saved_schedule(cfg: TrainCfg, saved_at: int, updates: int = 1) -> dict:
    """The schedule state of a run with `cfg` after `saved_at` steps of `updates` optimizer steps each."""
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([weight], cfg)
    sched = build_scheduler(opt, cfg, cfg.steps * updates, updates)
    for _ in range(saved_at * updates):
        opt.step(), sched.step()
    return sched.state_dict()


def _resumed(cfg: TrainCfg, state: dict, updates: int = 1):
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    sched = build_scheduler(build_optimizer([weight], cfg), cfg, cfg.steps * updates, updates)
    sched.load_state_dict(state)
    return sched


@pytest.mark.parametrize(("schedule", "warmup", "updates"), [("linear", 0, 1), ("cosine", 1, 2)])
def test_a_longer_run_names_the_rate_of_its_first_step_under_both_schedules(schedule, warmup, updates):
    """A 4-step run saved after step 2, resumed with train.steps=8: the note names the new schedule's rate
    (lr x lr_factor over 8 steps) and the saved one's (over 4), which differ (linear: 0.225 vs 0.15)."""
    short = TrainCfg(lr=0.3, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.0, steps=4)
    longer = TrainCfg(**{**vars(short), "steps": 8})
    sched = _resumed(longer, _saved_schedule(short, 2, updates), updates)
    now = 0.3 * lr_factor(2 * updates, longer, 8 * updates, updates)
    before = 0.3 * lr_factor(2 * updates, short, 4 * updates, updates)
    assert sched.get_last_lr()[0] == pytest.approx(now, rel=1e-12)
    assert resumed_rate_note(sched, longer, 2) == (
        f"note: the {schedule} learning-rate schedule now spans train.steps=8: step 3 runs at lr {now:.6g}, "
        f"where the schedule the checkpoint was saved with gave {before:.6g}"
    )
    if schedule == "linear":
        assert (now, before) == pytest.approx((0.225, 0.15), rel=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_no_note_where_the_rate_is_unchanged(schedule):
    """The same length (any schedule), or a constant schedule of another length: nothing jumps."""
    cfg = TrainCfg(lr=0.3, schedule=schedule, steps=4)
    assert resumed_rate_note(_resumed(cfg, _saved_schedule(cfg, 2)), cfg, 2) is None
    if schedule == "constant":
        longer = TrainCfg(**{**vars(cfg), "steps": 9})
        assert resumed_rate_note(_resumed(longer, _saved_schedule(cfg, 2)), longer, 2) is None


def test_a_resumed_run_prints_the_note_and_trains_at_the_new_rate(tmp_path, capsys):
    """A 2-step linear run extended to 4 steps: its saved schedule ended at lr 0 after step 2, the new one
    gives step 3 half the lr. Before: the rate jumped from 0 to 5e-4 and nothing said so."""
    cfg = run_config(tmp_path, train={"steps": 2, "schedule": "linear"}, checkpoint={"every": 1})
    cfg["grpo"] = {"prompts_per_step": 2, "group_size": 4}
    cfg["train"]["micro_batch_size"] = 8
    launch(tmp_path, cfg)
    capsys.readouterr()
    records = launch(tmp_path, {**cfg, "train": {**cfg["train"], "steps": 4}}, "--resume")
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "learning-rate" in line]
    assert notes == [
        "note: the linear learning-rate schedule now spans train.steps=4: step 3 runs at lr 0.0005, where the "
        "schedule the checkpoint was saved with gave 0"
    ], out
    assert [r["lr"] for r in records if r["step"] == 3] == [pytest.approx(5e-4, rel=1e-9)]


@pytest.mark.parametrize(
    ("key", "value"), [("lr", 2e-6), ("warmup_steps", 1), ("schedule", "cosine"), ("min_lr_ratio", 0.1)]
)
def test_the_other_settings_of_the_rate_curve_are_refused_on_resume(tmp_path, key, value):
    """Only train.steps may change the curve (and is noted); a change of lr, warmup, schedule or a decay's
    floor is refused before anything loads, naming the key with both values."""
    cfg = Config()
    cfg.run.output_dir, cfg.run.name, cfg.train.steps, cfg.train.schedule = str(tmp_path), "run", 4, "linear"
    state = {"optimizer": {}, "scheduler": {}, "data": {"epoch": 0, "index": 0}}
    save_checkpoint(
        cfg.run.run_dir, 2, model=tiny_model(), tokenizer=None, keep_last=2, run_config=cfg.to_dict(),
        trainer_state=state,
    )  # fmt: skip
    resumed = copy.deepcopy(cfg)
    resumed.run.resume = True
    setattr(resumed.train, key, value)
    with pytest.raises(UserError, match=rf"--resume with a changed config: train\.{key} differs from "):
        check_run_dir(resumed, resumable_changes(resumed))
