"""What a run folder given as `--checkpoint` to eval or export stands for: the checkpoint a resume would
continue from, else the run's final model.

    run_folder_pick(Path("runs/x"), "evaluate")   # runs/x/checkpoints/step_000050 (or None: no run folder)

The rules are a resume's (checkpoint.find_resume_checkpoint): the newest intact checkpoint, a step whose
save was killed between its two renames taken from its temporary folder (checkpoint.moved_aside), a
newer checkpoint proven broken passed over with a warning naming its bad file, and a newer one whose file
the system cannot read (permission, I/O error) a one-line error naming it: it may be intact, so no older
checkpoint is silently used in its place. A checkpoint deleted while it is checked (a run still training
prunes its older ones) is a FileNotFoundError, so that errors.read_vanishing picks again.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

from minigrpo.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    UnreadableCheckpointError,
    checkpoint_dir,
    list_checkpoints,
    moved_aside,
    verify_as_step,
)
from minigrpo.errors import UserError

# the model folders a run writes beside its config.yaml: a LoRA run's merged export, an SFT run's model
RUN_OUTPUTS = ("merged", "model")
HALF_WRITTEN = ".tmp-step_*"  # a checkpoint folder while save_checkpoint writes it (left there by a kill)


def run_folder_pick(folder: Path, action: str) -> Path | None:
    """What a run folder (run_dir, or its checkpoints/ folder) given as --checkpoint stands for when an
    entry point `action`s it (evaluate, export): its newest intact checkpoint (see the module docstring),
    else its final model (run_dir/merged of a LoRA run, run_dir/model of an SFT run). None for a folder
    that is no run's (a model folder, a hub id). A run with nothing to use is one line: no checkpoint at
    all, or every checkpoint broken (the newest one's bad file named)."""
    if not folder.is_dir() or (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
        return None
    run_dir = folder.parent if folder.name == "checkpoints" and is_run_folder(folder.parent) else folder
    candidates = resume_candidates(run_dir)
    finals = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name / "config.json").is_file()]
    if not candidates and not finals and not (run_dir / "metrics.jsonl").is_file():
        return None  # no run's folder: the model loader names what it lacks
    picked, broken = newest_intact(folder, candidates)
    if picked is None and finals:
        picked = finals[0]
    if picked is not None:
        for error in broken:
            warnings.warn(CheckpointWarning(f"skipping a broken checkpoint: {error}; using {picked}"), stacklevel=2)
        return picked
    if broken:
        raise UserError(f"--checkpoint {folder}: a run folder whose checkpoints are all broken (newest: {broken[0]})")
    raise UserError(
        f"--checkpoint {folder}: a run folder with nothing to {action} (no checkpoints/step_* folder"
        f"{half_written(run_dir)}, no final {' or '.join(RUN_OUTPUTS)} folder): train with checkpoint.every or "
        "checkpoint.save_final"
    )


def resume_candidates(run_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint folder a resume considers, as (step, path), newest first: the step_N folders and
    the moved-aside folders of a step saved again (its new folder before its earlier one)."""
    found = list_checkpoints(run_dir) + moved_aside(run_dir)
    return sorted(found, key=lambda item: item[0], reverse=True)  # stable: moved_aside's order kept


def newest_intact(folder: Path, candidates: list[tuple[int, Path]]) -> tuple[Path | None, list[CheckpointError]]:
    """(The first of `candidates` whose files check out, or None; the errors of those passed over before
    it). A file that cannot be read stops the search (UserError naming it); a candidate that vanished
    while it was checked is a FileNotFoundError (the run folder changed: pick again)."""
    broken: list[CheckpointError] = []
    for step, path in candidates:
        try:
            verify_as_step(path, step)
        except UnreadableCheckpointError as e:
            raise UserError(unreadable_pick_message(folder, path, e)) from e
        except CheckpointError as e:
            if not path.is_dir():  # pruned (or put in place) by a run still training, not broken
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from e
            broken.append(e)
            continue
        if path != checkpoint_dir(path.parent.parent, step):
            message = f"step {step} was being saved again when its run stopped: using {path}, which a resume keeps"
            warnings.warn(CheckpointWarning(message), stacklevel=3)
        return path, broken
    return None, broken


def unreadable_pick_message(folder: Path, path: Path, error: UnreadableCheckpointError) -> str:
    """The one line for a checkpoint `path` of run folder `folder` whose file the system refused to read:
    it may be intact, so no older checkpoint is used in its place."""
    cause = error.__cause__
    if isinstance(cause, OSError):
        what = f"{cause.filename or path} cannot be read ({cause.strerror or cause})"
    else:
        what = str(error)
    return (
        f"--checkpoint {folder}: {what}, so its checkpoint {path} may be intact and is not passed over for an "
        "older one; make the file readable, or give an older checkpoint folder as --checkpoint"
    )


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a run's folder: it holds a checkpoint or the run's metrics.jsonl."""
    return bool(resume_candidates(folder)) or (folder / "metrics.jsonl").is_file()


def half_written(run_dir: Path) -> str:
    """`, only the half-written .tmp-step_N` when a checkpoint was cut short while being written (the
    process killed meanwhile): named, so that the folder is not taken for a checkpoint; else ""."""
    root = run_dir / "checkpoints"
    partial = sorted(p.name for p in root.glob(HALF_WRITTEN)) if root.is_dir() else []
    return f", only the half-written {partial[-1]}" if partial else ""


__all__ = ["HALF_WRITTEN", "RUN_OUTPUTS", "half_written", "is_run_folder", "run_folder_pick"]
