"""Checkpoints that a resume must not lose: a step saved again whose save was killed between its two
renames (the earlier folder moved aside, the new one not yet in place), and a checkpoint whose file the
system cannot read for a moment (not proven broken, so never passed over and deleted)."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
from pathlib import Path

import pytest
from helpers.tiny import tiny_model

from minigrpo.bookkeeping import how_to_go_on
from minigrpo.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    UnreadableCheckpointError,
    find_resume_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from minigrpo.config import Config
from minigrpo.errors import UserError

NO_OPTIMIZER_STATE = {"format": "by_name", "param_names": [], "param_groups": [], "group_sizes": [], "state": {}}


def save(run_dir: Path, step: int, index: int, run_config: dict | None = None) -> Path:
    """Checkpoint `step` as the trainer writes it; `index` (the data cursor) tells two saves of a step apart."""
    state = {"optimizer": NO_OPTIMIZER_STATE, "scheduler": {}, "data": {"epoch": 0, "index": index}}
    return save_checkpoint(
        run_dir, step, model=tiny_model(seed=index), tokenizer=None, trainer_state=state, keep_last=5,
        run_config=run_config,
    )  # fmt: skip


class Killed(BaseException):
    """The process killed (SIGKILL): nothing after it runs, no handler included."""


def killed_after_the_first_rename(monkeypatch) -> None:
    """os.rename and shutil.rmtree as in a process killed right after its first rename: every later
    call (the handler's rename back included) raises Killed."""
    real_rename, real_rmtree, done = os.rename, shutil.rmtree, []

    def rename(src, dst, *args, **kwargs):
        if done:
            raise Killed
        done.append(dst)
        return real_rename(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if done:
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


def step_saved_twice_and_killed(tmp_path: Path, monkeypatch) -> Path:
    """step_000002, then step_000004 saved with index 40 and saved again with index 41, killed between the
    renames of the second save. Returns the checkpoints folder."""
    save(tmp_path, 2, index=20)
    save(tmp_path, 4, index=40)
    killed_after_the_first_rename(monkeypatch)
    with pytest.raises(Killed):
        save(tmp_path, 4, index=41)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-old-step_000004", ".tmp-step_000004", "step_000002"]
    return root


def test_a_step_saved_again_and_killed_between_its_renames_resumes_from_its_new_folder(tmp_path, monkeypatch):
    """Before: the resume took step_000002 (step 4 was in neither step folder) and its first save deleted both
    folders of step 4 with the other temporary ones: two steps of training lost though both were whole."""
    root = step_saved_twice_and_killed(tmp_path, monkeypatch)
    with pytest.warns(CheckpointWarning, match=r"step 4 was being saved again when the run stopped: resuming from"):
        path, state = find_resume_checkpoint(tmp_path)
    assert path == root / ".tmp-step_000004" and state["step"] == 4 and state["data"]["index"] == 41
    assert how_to_go_on(tmp_path) == f"continue from {path} with --resume"
    save(tmp_path, 6, index=60)  # the resumed run's first save puts step 4 back in place
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    assert load_trainer_state(root / "step_000004")["data"]["index"] == 41


def test_a_broken_new_folder_resumes_from_the_earlier_folder_moved_aside(tmp_path, monkeypatch):
    """The new folder cut short (its weights truncated): the step's earlier save, moved aside, is whole."""
    root = step_saved_twice_and_killed(tmp_path, monkeypatch)
    weights = root / ".tmp-step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(CheckpointWarning) as caught:
        path, state = find_resume_checkpoint(tmp_path)
    assert path == root / ".tmp-old-step_000004" and state["data"]["index"] == 40
    assert any("skipping a broken checkpoint" in str(w.message) and str(weights) in str(w.message) for w in caught)
    save(tmp_path, 6, index=60)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    assert load_trainer_state(root / "step_000004")["data"]["index"] == 40


def unreadable(monkeypatch, file: Path, code: int = errno.EIO) -> None:
    """Path.read_text of `file` fails as on a disk or network error (tests run as root: no permissions)."""
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if Path(self) == file:
            raise OSError(code, os.strerror(code), str(file))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)


def test_a_newest_checkpoint_whose_run_config_cannot_be_read_stops_the_resume_and_stays(tmp_path, monkeypatch):
    """Before: its read error counted as a broken checkpoint, the resume fell back to step_000002 with a
    warning, and the resumed run's first save deleted step_000004 (an abandoned timeline) for good."""
    cfg = Config().to_dict()
    save(tmp_path, 2, index=20, run_config=cfg)
    newest = save(tmp_path, 4, index=40, run_config=cfg)
    unreadable(monkeypatch, newest / "run_config.yaml")
    with pytest.raises(UnreadableCheckpointError) as info:
        find_resume_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{newest / 'run_config.yaml'} cannot be read (Input/output error): {newest} may be")
    assert "\n" not in message and isinstance(info.value, UserError)
    assert how_to_go_on(tmp_path) == message  # Ctrl-C: no advice to delete the run folder
    monkeypatch.undo()
    assert find_resume_checkpoint(tmp_path)[0] == newest  # readable again: the resume takes it


@pytest.mark.parametrize("name", ["trainer_state/state.json", "config.json"])
def test_a_file_that_cannot_be_read_is_one_error_line_naming_it(tmp_path, monkeypatch, name):
    """Before: the OSError of state.json (or of config.json) came out of find_resume_checkpoint raw, a
    traceback from --resume instead of one line."""
    newest = save(tmp_path, 4, index=40)
    unreadable(monkeypatch, newest / name, errno.EACCES)
    with pytest.raises(UnreadableCheckpointError, match=rf"^{newest / name} cannot be read \(Permission denied\)"):
        find_resume_checkpoint(tmp_path)


def test_a_checkpoint_proven_broken_is_still_passed_over(tmp_path):
    """A truncated file is no read error: the resume falls back past it, as before."""
    save(tmp_path, 2, index=20)
    newest = save(tmp_path, 4, index=40)
    (newest / "trainer_state" / "state.json").write_text("{")
    with pytest.warns(CheckpointWarning, match="skipping a broken checkpoint"):
        path, _ = find_resume_checkpoint(tmp_path)
    assert path.name == "step_000002"
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_trainer_state(newest)


def test_a_new_folder_that_cannot_be_read_stops_the_save_instead_of_putting_the_earlier_one_back(tmp_path, monkeypatch):
    """The resume continued from .tmp-step_N; a passing read error on it at the next save made the earlier
    folder step_N and the sweep then deleted the one the run had continued from: the save now stops."""
    root = step_saved_twice_and_killed(tmp_path, monkeypatch)
    unreadable(monkeypatch, root / ".tmp-step_000004" / "trainer_state" / "state.json")
    with pytest.raises(UnreadableCheckpointError):
        save(tmp_path, 6, index=60)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == [".tmp-old-step_000004", ".tmp-step_000004", "step_000002"]


def test_the_ctrl_c_line_reads_no_trainer_state_tensors(tmp_path, monkeypatch):
    """Naming the checkpoint to continue from verified it whole, optimizer moments included (1 GiB read
    in 1.5 s for 1 GiB of moments, while the run still held its model): headers suffice to name it."""
    from minigrpo import checkpoint_files

    save(tmp_path, 2, index=20)
    newest = save(tmp_path, 4, index=40)

    def no_data(*args, **kwargs):
        raise AssertionError("the trainer state's tensors were read")

    monkeypatch.setattr(checkpoint_files, "iter_tensors", no_data)
    assert how_to_go_on(tmp_path) == f"continue from {newest} with --resume"
    monkeypatch.undo()
    state = (newest / "trainer_state" / "tensors.safetensors").read_bytes()
    (newest / "trainer_state" / "tensors.safetensors").write_bytes(state[:-8])  # cut short: passed over
    assert how_to_go_on(tmp_path) == f"continue from {tmp_path / 'checkpoints' / 'step_000002'} with --resume"
