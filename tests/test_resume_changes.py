"""A --resume after the config was edited: a change that alters what the run computes is one line naming
each key with its saved and its new value (before any weights load); the settings the run does not read
and those that only trade memory may change; checkpoints written or pruned around a failure leave a
folder that resumes."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.runs import TIMING, launch, run_config
from helpers.tiny import tiny_model, tiny_run_checkpoint

from minigrpo import build
from minigrpo.checkpoint import CheckpointError, find_resume_checkpoint, save_checkpoint
from minigrpo.errors import UserError


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[Path, dict]:
    """A one-step run (jsonl data, own sampler, no LoRA, constant schedule) with its checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    cfg = run_config(root, train={"steps": 1}, checkpoint={"every": 1})
    launch(root, cfg)
    return root, cfg


def resume_error(root: Path, cfg: dict, *overrides: str) -> str | None:
    """What check_before_loading says about a --resume of `cfg` at 2 steps with `overrides` (None: accepted);
    the model must not load meanwhile."""
    from minigrpo.config import load_config

    path = root / "resumed.yaml"
    path.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "steps": 2}}))
    resumed = load_config(path, ["run.resume=true", *overrides])
    loading = pytest.MonkeyPatch()
    loading.setattr(build, "load_pretrained", lambda *a, **k: pytest.fail("the weights loaded before the check"))
    try:
        build.check_before_loading(resumed)
    except UserError as e:
        return str(e)
    finally:
        loading.undo()
    return None


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.lr=0.01"], "train.lr: 0.001 there, 0.01 now"),
        (["grpo.group_size=8"], "grpo.group_size: 16 there, 8 now"),
        (["train.schedule=cosine", "train.warmup_steps=1"], "train.schedule: 'constant' there, 'cosine' now; "),
        (["run.seed=1"], "run.seed: 0 there, 1 now"),
        (["lora.enabled=true"], "lora.enabled: false there, true now"),
        (["algorithm=ppo"], "algorithm: 'grpo' there, 'ppo' now"),
        (["rewards.0.weight=0.5"], "rewards.0.weight: 1.0 there, 0.5 now"),
    ],
)
def test_a_refused_change_names_each_key_with_its_saved_and_new_value(checkpointed, overrides, named):
    """Before: `train.lr differs from .../run_config.yaml`, without saying to what (the user had to diff
    the YAML files to see which edit the resume refused)."""
    root, cfg = checkpointed
    message = resume_error(root, cfg, *overrides)
    assert message is not None and message.startswith("--resume with a changed config: "), message
    assert named in message and "\n" not in message, message


def test_another_model_folder_is_refused_naming_both_before_loading(checkpointed, tmp_path):
    root, cfg = checkpointed
    other = tmp_path / "other_model"
    tiny_run_checkpoint(other, seed=0)  # the same architecture: only the path tells them apart
    message = resume_error(root, cfg, f"model.name_or_path={other}")
    assert f"model.name_or_path: '{root / 'model'}' there, '{other}' now" in message, message


def test_added_reward_functions_are_named_by_their_names(checkpointed):
    root, cfg = checkpointed
    message = resume_error(root, {**cfg, "rewards": [{"name": "exact_answer"}, {"name": "soft_format"}]})
    assert "rewards: ['exact_answer'] there, ['exact_answer', 'soft_format'] now" in message, message


@pytest.mark.parametrize(
    "override",
    [
        "lora.r=4",  # LoRA is off
        "lora.targets=[q,v]",
        "data.synthetic.max_operand=5",  # data.source is jsonl
        "sampler.vllm_probe_every=3",  # the own sampler
        "grpo.is_cap=2.0",  # no grpo.is_correction
        "grpo.max_resample_rounds=1",  # no grpo.dynamic_sampling
        "train.min_lr_ratio=0.1",  # the constant schedule
    ],
)
def test_a_resume_may_change_a_setting_the_run_does_not_read(checkpointed, override):
    """Before: refused as a changed config, though nothing the resumed run computes reads it."""
    root, cfg = checkpointed
    with pytest.warns(Warning, match="ignored, .*read only"):  # as for a new run: said, not refused
        assert resume_error(root, cfg, override) is None


@pytest.mark.parametrize(
    "override",
    [
        "distributed.strategy=ddp",
        "distributed.reshard_after_forward=false",
        "sampler.vllm_sleep=false",
        "sampler.gpu_memory_utilization=0.2",
        "sampler.merge_lora=false",
    ],
)
def test_a_resume_may_change_what_the_memory_preflight_suggests(checkpointed, override):
    """memory.py names these settings to a run that does not fit; before, the resume refused them."""
    root, cfg = checkpointed
    assert resume_error(root, cfg, override) is None


def test_a_change_read_by_the_run_is_still_refused_beside_an_unread_one(checkpointed):
    root, cfg = checkpointed
    with pytest.warns(Warning, match="lora.r=4: ignored"):
        message = resume_error(root, cfg, "lora.r=4", "train.lr=0.01", "distributed.strategy=ddp")
    assert message.startswith("--resume with a changed config: train.lr differs from "), message


def test_a_resume_with_accepted_changes_equals_the_uninterrupted_run(tmp_path):
    """Three steps, checkpoints every step (keep_last 3), resumed to four with keep_last 1, the ddp
    strategy, FSDP's resharding and an unread lora.r changed: the same records as four steps straight,
    and the one checkpoint kept is the newest."""
    cfg = run_config(tmp_path, train={"steps": 3}, checkpoint={"every": 1, "keep_last": 3})
    longer = {**cfg["train"], "steps": 4}
    straight = launch(tmp_path, {**cfg, "run": {**cfg["run"], "name": "straight"}, "train": longer})
    launch(tmp_path, cfg)
    changed = {
        **cfg,
        "train": longer,
        "checkpoint": {**cfg["checkpoint"], "keep_last": 1},
        "distributed": {"strategy": "ddp", "reshard_after_forward": False},
        "lora": {"r": 4},
    }
    resumed = launch(tmp_path, changed, "--resume")
    same = lambda record: {k: v for k, v in record.items() if not k.startswith(TIMING)}
    assert [same(r) for r in resumed] == [same(r) for r in straight]
    assert sorted(p.name for p in (tmp_path / "runs" / "run" / "checkpoints").iterdir()) == ["step_000004"]


# ------------------------------------------------------------------------------------------------
# a failure while a checkpoint is written or pruned

NO_OPTIMIZER_STATE = {"format": "by_name", "param_names": [], "param_groups": [], "group_sizes": [], "state": {}}


def save(run_dir: Path, step: int, keep_last: int = 3) -> Path:
    state = {"optimizer": NO_OPTIMIZER_STATE, "scheduler": {}, "data": {"epoch": 0, "index": 4 * step}}
    return save_checkpoint(
        run_dir, step, model=tiny_model(seed=step), tokenizer=None, trainer_state=state, keep_last=keep_last
    )


def failing_rename_into(name: str):
    """os.rename failing (an I/O error) for the rename of a temporary folder onto checkpoints/`name`."""
    rename = os.rename

    def fail(src, dst, *args, **kwargs):
        if Path(dst).name == name and Path(src).name.startswith(".tmp-step_"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return rename(src, dst, *args, **kwargs)

    return fail


def test_a_failed_rename_into_place_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Before: the OSError came out raw (a traceback from the CLI) and the temporary folder stayed."""
    save(tmp_path, 2)
    monkeypatch.setattr(os, "rename", failing_rename_into("step_000004"))
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 4)
    message = str(info.value)
    assert message.startswith(f"cannot move checkpoint {tmp_path / 'checkpoints' / 'step_000004'} into place: ")
    assert message.endswith(f"the previous checkpoint {tmp_path / 'checkpoints' / 'step_000002'} is kept"), message
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert find_resume_checkpoint(tmp_path)[0].name == "step_000002"


def test_a_step_saved_again_keeps_its_earlier_folder_when_the_rename_fails(tmp_path, monkeypatch):
    """A step written twice (a resume that fell back past it): the earlier folder is moved aside first;
    before, a failed rename left it under a temporary name that the next save deleted."""
    save(tmp_path, 2)
    earlier = save(tmp_path, 4)
    monkeypatch.setattr(os, "rename", failing_rename_into("step_000004"))
    with pytest.raises(CheckpointError, match=r"cannot move checkpoint .*step_000004 into place"):
        save(tmp_path, 4)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    found, state = find_resume_checkpoint(tmp_path)
    assert found == earlier and state["step"] == 4


def test_a_failed_prune_leaves_the_new_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """shutil.rmtree failing on the folders pruned: the new checkpoint is in place before any deletion,
    and the next save clears what was left."""
    for step in (1, 2):
        save(tmp_path, step, keep_last=1)
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        if "rm-step_" in str(path):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, keep_last=1)
    monkeypatch.undo()
    assert find_resume_checkpoint(tmp_path)[0].name == "step_000003"
    save(tmp_path, 4, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_nothing_to_resume_names_a_half_written_checkpoint(tmp_path):
    """A run killed while writing its first checkpoint: --resume says the folder holds only that."""
    from minigrpo.build import check_run_dir
    from minigrpo.config import Config

    cfg = Config()
    cfg.run.output_dir, cfg.run.name, cfg.run.resume = str(tmp_path), "run", True
    (cfg.run.run_dir / "checkpoints" / ".tmp-step_000002").mkdir(parents=True)
    with pytest.raises(UserError) as info:
        check_run_dir(cfg)
    assert str(info.value) == (
        f"nothing to resume: {cfg.run.run_dir} holds no checkpoint, only the half-written .tmp-step_000002 "
        "(check run.name and run.output_dir)"
    )
