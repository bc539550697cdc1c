"""Training checkpoints: written atomically, checked before a resume, never unpickled.

    run_dir/checkpoints/step_000050/
        config.json, model.safetensors, generation_config.json, tokenizer files   an HF checkpoint:
            (or adapter_config.json + adapter_model.safetensors for LoRA runs)   load_pretrained() reads it
        run_config.yaml             the resolved run config
        trainer_state/
            tensors.safetensors     every tensor of the trainer state (optimizer moments, fp32 masters, RNG)
            state.json              the rest (scheduler, data cursor, step, RNG tuples), with the manifest
                                    that rebuilds the exact structure (minigrpo/tensor_tree.py)

The trainer state has its own subfolder so that tools which take every *.safetensors file of a model
folder as weights (vLLM, scripts) see only the model.

No file of a checkpoint is ever unpickled: a pickle can run any code its author chose, and a
checkpoint folder may come from anywhere. Weights and trainer state are safetensors (raw bytes) and
JSON. A `trainer_state.pt` (the pickle older versions wrote) is never opened.

Any number of ranks. Nothing in a checkpoint depends on how many processes wrote it, so a run saved
by one process resumes on two and vice versa: the model is a whole HF checkpoint (FSDP shards are
gathered tensor by tensor to rank 0, which writes everything), the optimizer state is keyed by
parameter name with whole tensors (minigrpo/optim_state.py), the data cursor is the same on every
rank, and the RNG states of all ranks are kept (a resume on as many ranks restores each rank's own;
on another number of ranks the trainer reseeds them).

Written atomically: into a hidden temporary folder, every file fsync'ed, then renamed into place, so
a run killed at any moment leaves the previous checkpoints or the new one, never a half-written one.
A full disk removes the temporary folder and says so (CheckpointError). A resume takes the newest
checkpoint whose files are all intact (`find_resume_checkpoint`; the checks: checkpoint_files.py) and
warns about newer broken ones; its first save deletes those (a timeline abandoned) before keeping the
newest `keep_last`. A newer checkpoint that cannot be read (not proven broken) stops the resume
instead. A step saved a second time whose save was killed between moving its earlier folder aside
and renaming the new one into place is resumed from the temporary folder (the new one if intact),
which the next save renames back into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from minigrpo.atomic import fsync_dir, fsync_file, write_probe_error
from minigrpo.checkpoint_files import (
    RUN_CONFIG,
    STATE_DIR,
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    STEP_DIR,
    UnreadableCheckpointError,
    load_trainer_state,
    verify_checkpoint,
)
from minigrpo.configio import dump_yaml
from minigrpo.errors import UserError
from minigrpo.models.loading import save_pretrained
from minigrpo.models.safetensors_io import CheckpointError, CorruptCheckpointError, save_file
from minigrpo.optim_state import load_masters, load_optimizer_state, optimizer_state
from minigrpo.rng_states import restore_rng, rng_state, set_rng_state
from minigrpo.tensor_tree import flatten

_TEMP_PREFIX = ".tmp-"


class CheckpointWarning(UserWarning):
    """A checkpoint that was skipped (broken files) while looking for one to resume from."""


# ------------------------------------------------------------------------------------------------
# where checkpoints live


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint folder of a run (`step_NNNNNN`, intact or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder, unchecked (see find_resume_checkpoint for one to resume from)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def check_writable(directory: Path, what: str = "checkpoints") -> None:
    """Raise CheckpointError naming `directory` unless `what` (checkpoints; eval: "the results") can be
    written there.

    The folder need not exist yet: its nearest existing parent must be a writable folder (a file is
    created there and removed: atomic.write_probe_error).
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(f"cannot write {what} to {directory}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {what} to {directory}: {existing} is not writable")
    problem = write_probe_error(existing)
    if problem is not None:
        raise CheckpointError(f"cannot write {what} to {directory}: {problem}")


# ------------------------------------------------------------------------------------------------
# writing


class ModelStateView:
    """What save_pretrained reads of a model (args, lm_head, dtype, state_dict), over a state dict
    gathered from shards, so rank 0 writes a sharded model as one ordinary HF checkpoint."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.args, self.lm_head, self.dtype = model.args, model.lm_head, dtype
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep_last: int,
    run_config: dict[str, Any] | None = None,
    save_model=save_pretrained,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then prune the others (`prune_checkpoints`): those of later
    steps (an abandoned timeline) and all but the newest `keep_last`.

    trainer_state: nested dicts/lists/tuples of tensors, numpy arrays and plain values (optimizer and
    scheduler state, data cursor, counters); the RNG states are added here: this process's as "rng",
    and `rng_states` (one per rank, gathered by the caller) as "rng_per_rank".
    save_model(model, tokenizer, dir) writes the weights.

    A full disk (or any other failed write) raises CheckpointError naming the checkpoint and the
    newest one kept; the partial folder is removed and the earlier checkpoints stay as they were.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{_TEMP_PREFIX}{final.name}")
    rng = rng_state()
    state = {**trainer_state, "step": step, "rng": rng, "rng_per_rank": rng_states or [rng]}
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        restore_moved_aside(run_dir)  # a step whose save was killed between its renames: kept, not swept
        for stale in final.parent.glob(f"{_TEMP_PREFIX}*"):  # left by a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_model(model, tokenizer, tmp)
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(dump_yaml(run_config), encoding="utf-8")  # whatever the locale
        save_trainer_state(tmp, state)  # after run_config.yaml: state.json records that there is one
        _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on device: {final} (step {step} not saved; {_kept(run_dir)})") from e
        where = f" ({e.filename})" if e.filename else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}{where}; {_kept(run_dir)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _replace_dir(tmp, final)
    except OSError as e:  # the rename into place: the new checkpoint is not there, the earlier ones are
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot move checkpoint {final} into place: {e.strerror or e}; {_kept(run_dir)}") from e
    prune_checkpoints(run_dir, step, keep_last)
    return final


def _kept(run_dir: Path) -> str:
    """What a failed save leaves to resume from: the newest checkpoint folder, kept as it was."""
    newest = latest_checkpoint(run_dir)
    return "no earlier checkpoint to resume from" if newest is None else f"the previous checkpoint {newest} is kept"


def prune_checkpoints(run_dir: Path, saved_step: int, keep_last: int) -> None:
    """After `saved_step` was saved: delete every checkpoint of a later step, and all but the newest
    `keep_last` of the others (`saved_step` always among the kept).

    A checkpoint newer than the one just written belongs to an abandoned timeline: a resume only
    continues from an older checkpoint when every newer one was broken, so those are never resumed
    from again, and counting them towards `keep_last` would delete the good checkpoints instead.

    Each folder is renamed to a temporary name before it is deleted: a run killed half-way through a
    deletion leaves a temporary folder (removed by the next save), never a step folder missing files
    that might still pass verify_checkpoint (files such as generation_config.json are not checked) and be
    resumed from.
    """
    found = list_checkpoints(run_dir)
    at_or_before = [path for step, path in found if step <= saved_step]
    doomed = [path for step, path in found if step > saved_step] + at_or_before[: -max(keep_last, 1)]
    gone = []
    for path in doomed:
        aside = path.with_name(f"{_TEMP_PREFIX}rm-{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(path, aside)
        except OSError:
            aside = path
        gone.append(aside)
    if gone:
        fsync_dir(Path(run_dir) / "checkpoints")  # the renames reach the disk before any file is deleted
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)


def save_trainer_state(checkpoint: Path, state: dict[str, Any]) -> None:
    """Write `state` into checkpoint/trainer_state/: tensors.safetensors (its tensors) + state.json (the rest).

    state.json also records whether the checkpoint holds a run_config.yaml: a resume compares the run's
    config with it, so once recorded it must be there (verify_checkpoint), or a deleted file would let
    a changed config through unchecked."""
    folder = Path(checkpoint) / STATE_DIR
    folder.mkdir(exist_ok=True)
    manifest, tensors = flatten(state)
    save_file(tensors, folder / STATE_TENSORS)
    summary = {k: state[k] for k in ("step", "world_size") if isinstance(state.get(k), int)}
    config = {"run_config": RUN_CONFIG} if (Path(checkpoint) / RUN_CONFIG).is_file() else {}
    document = {"format": STATE_FORMAT, **summary, **config, "tensors": STATE_TENSORS, "state": manifest}
    (folder / STATE_JSON).write_text(json.dumps(document, indent=1) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a `final` already there (a step saved twice) is moved aside first, and
    back if the rename fails. A process killed between the two renames leaves both folders under
    temporary names: a resume finds them (moved_aside) and the next save puts one back in place."""
    old = final.with_name(f"{_TEMP_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old.exists():  # the step's earlier folder goes back where it was
            os.rename(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# reading and checking (checkpoint_files.py: verify_checkpoint, load_trainer_state)


@contextmanager
def restoring(checkpoint: Path, what: str) -> Iterator[None]:
    """Restore `what` of checkpoint's trainer state inside this block: a part this run cannot take (the
    optimizer state of other parameters, a damaged schedule or RNG state) is a CorruptCheckpointError
    naming state.json, one line, not a traceback from deep inside torch."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        file = Path(checkpoint) / STATE_DIR / STATE_JSON
        raise CorruptCheckpointError(f"{file}: cannot restore its {what} ({type(e).__name__}: {e})") from e


def find_resume_checkpoint(run_dir: Path, *, read_tensors: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of a run and its trainer state; None when it has none at all.

    A newer checkpoint with a bad file is skipped with a CheckpointWarning naming the file. When
    every checkpoint is broken, a CheckpointError names the newest one's bad file. A newer checkpoint
    whose file cannot be read (UnreadableCheckpointError) is not skipped: its error is raised, since
    the resumed run's first save would delete it. A step whose save was killed between its two renames
    is taken from its temporary folder (`moved_aside`), which the next save puts in place. read_tensors
    False reads the trainer state's tensors by their headers alone (verify_checkpoint): naming one, not loading it.
    """
    candidates = sorted(list_checkpoints(run_dir) + moved_aside(run_dir), key=lambda found: found[0], reverse=True)
    if not candidates:
        return None
    skipped: list[CheckpointError] = []
    for step, path in candidates:  # newest first; a step's new folder before its earlier one (a stable sort)
        try:
            state = verify_as_step(path, step, read_tensors=read_tensors)
        except UnreadableCheckpointError:
            raise
        except CheckpointError as e:
            skipped.append(e)
            continue
        for error in skipped:
            message = f"skipping a broken checkpoint: {error}; resuming from {path}"
            warnings.warn(CheckpointWarning(message), stacklevel=2)
        if path != checkpoint_dir(run_dir, step):
            message = f"step {step} was being saved again when the run stopped: resuming from {path}"
            warnings.warn(CheckpointWarning(f"{message}, which the next save puts in place"), stacklevel=2)
        return path, state
    raise CheckpointError(f"no intact checkpoint to resume from in {Path(run_dir) / 'checkpoints'}: {skipped[0]}")


def moved_aside(run_dir: Path) -> list[tuple[int, Path]]:
    """The folders of a step saved again whose save was killed between the two renames of _replace_dir:
    for a step N without its step_N folder but with its earlier folder moved aside (.tmp-old-step_N), the
    new folder (.tmp-step_N, whole and fsynced before the first rename) and the earlier one, as (N, path),
    in this order of preference. The next save would delete them with the other temporary folders."""
    root = Path(run_dir) / "checkpoints"
    found: list[tuple[int, Path]] = []
    for old in sorted(root.glob(f"{_TEMP_PREFIX}old-step_*")) if root.is_dir() else []:
        name = old.name.removeprefix(f"{_TEMP_PREFIX}old-")
        match = STEP_DIR.match(name)
        if match and old.is_dir() and not (root / name).exists():
            new = root / f"{_TEMP_PREFIX}{name}"
            found += [(int(match.group(1)), path) for path in (new, old) if path.is_dir()]
    return found


def verify_as_step(path: Path, step: int, *, read_tensors: bool = True) -> dict[str, Any]:
    """verify_checkpoint(path), and its trainer state of `step` (a temporary folder name gives no step)."""
    state = verify_checkpoint(path, read_tensors=read_tensors)
    if state["step"] != step:
        raise CorruptCheckpointError(f"{path / STATE_DIR / STATE_JSON}: step {state['step']}, not step {step}")
    return state


def restore_moved_aside(run_dir: Path) -> None:
    """Rename each step's preferred intact folder of `moved_aside` into place (step_N), before a save
    deletes the temporary folders: the folder a resume may have continued from stays a checkpoint."""
    restored = False
    for step, path in moved_aside(run_dir):
        final = checkpoint_dir(run_dir, step)
        if final.exists():  # the step's new folder went in already
            continue
        try:
            verify_as_step(path, step)
        except UnreadableCheckpointError:
            raise  # maybe whole, maybe the one the run continued from: neither put back nor swept
        except CheckpointError:
            continue
        os.rename(path, final)
        restored = True
    if restored:
        fsync_dir(Path(run_dir) / "checkpoints")


def _fsync_tree(root: Path) -> None:
    """Every file's data and every folder's entries (trainer_state/ holds files too) reach the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "ModelStateView",
    "UnreadableCheckpointError",
    "check_writable",
    "checkpoint_dir",
    "find_resume_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_masters",
    "load_optimizer_state",
    "load_trainer_state",
    "optimizer_state",
    "prune_checkpoints",
    "restore_rng",
    "restoring",
    "rng_state",
    "save_checkpoint",
    "save_trainer_state",
    "set_rng_state",
    "verify_checkpoint",
]
