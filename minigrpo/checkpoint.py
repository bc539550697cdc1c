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
checkpoint whose files are all intact (`find_resume_checkpoint`) and warns about newer broken ones;
its first save deletes those (a timeline abandoned) before keeping the newest `keep_last`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from minigrpo.atomic import fsync_dir, fsync_file, write_probe_error
from minigrpo.configio import ConfigError, dump_yaml, parse_yaml
from minigrpo.errors import UserError
from minigrpo.lora_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, check_peft_adapter
from minigrpo.models.loading import check_model_source, save_pretrained
from minigrpo.models.safetensors_io import CheckpointError, CorruptCheckpointError, iter_tensors, read_header, save_file
from minigrpo.optim_state import load_masters, load_optimizer_state, optimizer_state
from minigrpo.rng_states import restore_rng, rng_state, set_rng_state
from minigrpo.tensor_tree import ManifestError, flatten, unflatten

STATE_DIR = "trainer_state"
STATE_JSON = "state.json"
STATE_TENSORS = "tensors.safetensors"
RUN_CONFIG = "run_config.yaml"
LEGACY_PICKLE = "trainer_state.pt"  # older versions: never opened
STATE_FORMAT = "minigrpo.trainer_state.v2"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
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
            match = _STEP_DIR.match(path.name)
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
    back if the rename fails."""
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
# reading and checking


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state saved in checkpoint folder `path`, exactly as it was given (tuples as tuples).

    Reads only trainer_state/state.json and trainer_state/tensors.safetensors; a CheckpointError
    names the file that is missing, truncated or corrupt. A checkpoint of an older version holds a
    pickle (trainer_state.pt): it is refused, never opened.
    """
    return _read_trainer_state(path)[1]


def _read_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json's document, the trainer state) of checkpoint folder `path` (load_trainer_state)."""
    path = Path(path)
    json_file, tensor_file = path / STATE_DIR / STATE_JSON, path / STATE_DIR / STATE_TENSORS
    if not json_file.is_file():
        if (path / LEGACY_PICKLE).exists():
            raise CheckpointError(_legacy_message(path))
        raise CheckpointError(f"{json_file} is missing: {path} is no complete training checkpoint")
    try:
        document = json.loads(json_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{json_file}: not valid JSON, the file is truncated or corrupt ({e})") from e
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise CorruptCheckpointError(f"{json_file}: not a minigrpo trainer state (format {STATE_FORMAT} expected)")
    if not tensor_file.is_file():
        raise CheckpointError(f"{tensor_file} is missing: {path} is no complete training checkpoint")
    tensors = dict(iter_tensors(tensor_file))  # checks the header against the file size first
    try:
        state = unflatten(document.get("state"), tensors)
    except ManifestError as e:
        raise CorruptCheckpointError(f"{json_file}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpointError(f"{json_file}: the trainer state has no step")
    return document, state


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file a resume reads from checkpoint folder `path`; returns its trainer state.

    The trainer state must parse completely, hold everything a resume restores (step, optimizer,
    scheduler, data cursor, RNG, with their types) and belong to this folder's step; every
    safetensors file (weights, shards, adapter) must have an intact header and exactly the data it
    promises; every JSON file must parse, and run_config.yaml must be a YAML mapping (and be there
    when state.json says it was written). A CheckpointError names the first bad file.
    """
    path = Path(path)
    document, state = _read_trainer_state(path)
    _check_resumable(state, path / STATE_DIR / STATE_JSON)
    if document.get("run_config") == RUN_CONFIG and not (path / RUN_CONFIG).is_file():
        raise CheckpointError(f"{path / RUN_CONFIG} is missing: {path} is no complete training checkpoint")
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise CorruptCheckpointError(f"{path / STATE_DIR / STATE_JSON}: step {state['step']}, not {path.name}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path} holds no weights (no model or adapter .safetensors file)")
    for file in weights:
        read_header(file)
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{file}: not valid JSON, the file is truncated or corrupt ({e})") from e
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpointError(f"{index}: not a safetensors index (no weight_map of file names)")
        absent = sorted(name for name in set(weight_map.values()) if not (path / name).is_file())
        if absent:
            raise CheckpointError(f"{path / absent[0]} is listed in {index.name} but missing")
    if (path / "config.json").is_file():  # a whole model (a LoRA checkpoint holds an adapter instead)
        _check_model(path)
    elif (path / ADAPTER_CONFIG).exists() or (path / ADAPTER_WEIGHTS).exists():
        _check_adapter(path)
    _check_run_config(path / RUN_CONFIG)
    return state


def _check_model(path: Path) -> None:
    """The weights of a whole-model checkpoint are the ones its config.json describes (every tensor
    there, by name and shape; the tokenizer, if saved, fits its vocabulary), read from the headers
    alone: a tensor dropped or reshaped is a CheckpointError here, so a resume skips the checkpoint
    before any weights load rather than fail in load_weights after the policy loaded."""
    try:
        check_model_source(path, require_tokenizer=False)
    except CheckpointError:
        raise
    except UserError as e:  # config.json or tokenizer files no model can be built from
        raise CorruptCheckpointError(f"{path}: {e}") from e


def _check_adapter(path: Path) -> None:
    """The adapter of a LoRA checkpoint is one load_peft_adapter takes: a plain LoRA adapter_config.json
    and A (r, in) / B (out, r) weights of its rank, read from the config and the header alone, so that a
    resume skips a broken adapter before any weights load rather than fail after the base model loaded."""
    try:
        rank = check_peft_adapter(path)["r"]
    except AdapterError as e:
        raise CorruptCheckpointError(str(e)) from None
    for name, info in read_header(path / ADAPTER_WEIGHTS).items():
        shape = info["shape"]
        if len(shape) != 2 or shape[0 if ".lora_A." in name else 1] != rank:
            raise CorruptCheckpointError(
                f"{path / ADAPTER_WEIGHTS}: {name} has shape {shape}, not that of a rank-{rank} adapter "
                f"({ADAPTER_CONFIG} says r={rank})"
            )


# What a resume reads from the trainer state (minigrpo/build.py restore_state), with the type it needs.
_RESUMABLE_KEYS = {"step": int, "optimizer": dict, "scheduler": dict, "data": dict, "rng": dict}


def _check_resumable(state: dict[str, Any], json_file: Path) -> None:
    """A CorruptCheckpointError naming `json_file` unless `state` holds everything a resume restores
    (optimizer, schedule, data cursor, step, RNG) with the right types: a state that parses but lacks
    one would otherwise fail with a KeyError half-way through building the run."""
    for key, kind in _RESUMABLE_KEYS.items():
        if key not in state:
            raise CorruptCheckpointError(f"{json_file}: the trainer state has no {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CorruptCheckpointError(
                f"{json_file}: the trainer state's {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
            )
    cursor = state["data"]
    for key in ("epoch", "index"):
        if not isinstance(cursor.get(key), int) or isinstance(cursor.get(key), bool):
            raise CorruptCheckpointError(f"{json_file}: the trainer state's data cursor has no integer {key!r}")
    optimizer = state["optimizer"]
    if optimizer.get("format") == "by_name":
        for key, kind in (("param_names", list), ("param_groups", list), ("group_sizes", list), ("state", dict)):
            if not isinstance(optimizer.get(key), kind):
                raise CorruptCheckpointError(
                    f"{json_file}: the trainer state's optimizer has no {key!r} ({kind.__name__})"
                )
    for key in ("torch", "python", "numpy"):
        if key not in state["rng"]:
            raise CorruptCheckpointError(f"{json_file}: the trainer state's RNG has no {key!r} state")


def _check_run_config(file: Path) -> None:
    """A CorruptCheckpointError naming `file` unless it is absent or a YAML mapping (what a resume
    compares the run's config with)."""
    if not file.exists():
        return
    try:
        saved = parse_yaml(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{file}: not UTF-8 text (byte {e.start}); truncated or corrupt") from e
    except ConfigError as e:  # "not valid YAML: <problem> (line L, column C)", on one line
        raise CorruptCheckpointError(f"{file}: {e}; the file is truncated or corrupt") from e
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from e
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{file}: not a YAML mapping of config sections (found {type(saved).__name__})")


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


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of a run and its trainer state; None when it has none at all.

    A newer checkpoint with a bad file is skipped with a CheckpointWarning naming the file. When
    every checkpoint is broken, a CheckpointError names the newest one's bad file.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    skipped: list[CheckpointError] = []
    for _, path in reversed(found):
        try:
            state = verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append(e)
            continue
        for error in skipped:
            message = f"skipping a broken checkpoint: {error}; resuming from {path}"
            warnings.warn(CheckpointWarning(message), stacklevel=2)
        return path, state
    raise CheckpointError(f"no intact checkpoint to resume from in {Path(run_dir) / 'checkpoints'}: {skipped[0]}")


def _legacy_message(path: Path) -> str:
    return (
        f"{path / LEGACY_PICKLE}: a checkpoint of an older minigrpo that stores its trainer state as a "
        "pickle, which is never loaded (unpickling can run arbitrary code); resume from a newer "
        "checkpoint or start a new run from its weights (model.name_or_path)"
    )


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
