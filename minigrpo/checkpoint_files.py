"""The files of a training checkpoint: their names, and how a resume reads and checks them.

    step_000050/run_config.yaml, trainer_state/state.json, trainer_state/tensors.safetensors, the
    model's (or adapter's) files: the layout minigrpo/checkpoint.py writes.

A checkpoint a resume passes over is deleted by the resumed run's first save (an abandoned timeline),
so a check tells two failures apart: a file proven bad (missing, truncated, not parsing: a
CheckpointError, CorruptCheckpointError where it is there but damaged) and a file the system could
not read (permission denied, an I/O error, a network file system gone for a moment:
UnreadableCheckpointError), which says nothing about the checkpoint and stops the resume instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from minigrpo.configio import ConfigError, parse_yaml
from minigrpo.errors import UserError
from minigrpo.lora_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, check_peft_adapter
from minigrpo.models.loading import check_model_source
from minigrpo.models.safetensors_io import DTYPES, CheckpointError, CorruptCheckpointError, iter_tensors, read_header
from minigrpo.tensor_tree import ManifestError, unflatten

STATE_DIR = "trainer_state"
STATE_JSON = "state.json"
STATE_TENSORS = "tensors.safetensors"
RUN_CONFIG = "run_config.yaml"
LEGACY_PICKLE = "trainer_state.pt"  # older versions: never opened
STATE_FORMAT = "minigrpo.trainer_state.v2"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file the operating system could not read (not one proven broken): a resume stops
    on it rather than continue from an older checkpoint and delete this one with its first save."""


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state saved in checkpoint folder `path`, exactly as it was given (tuples as tuples).

    Reads only trainer_state/state.json and trainer_state/tensors.safetensors; a CheckpointError
    names the file that is missing, truncated or corrupt. A checkpoint of an older version holds a
    pickle (trainer_state.pt): it is refused, never opened.
    """
    return _read_trainer_state(path)[1]


def _read_trainer_state(path: Path, read_tensors: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json's document, the trainer state) of checkpoint folder `path` (load_trainer_state); with
    read_tensors False its tensors are left unfilled, in the header's shapes (none of the data is read)."""
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
    if read_tensors:
        tensors = dict(iter_tensors(tensor_file))  # checks the header against the file size first
    else:  # the header checked against the file size, as iter_tensors checks it
        tensors = {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]]) for k, v in read_header(tensor_file).items()}
    try:
        state = unflatten(document.get("state"), tensors)
    except ManifestError as e:
        raise CorruptCheckpointError(f"{json_file}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpointError(f"{json_file}: the trainer state has no step")
    return document, state


def verify_checkpoint(path: Path, *, read_tensors: bool = True) -> dict[str, Any]:
    """Check every file a resume reads from checkpoint folder `path`; returns its trainer state.

    The trainer state must parse completely, hold everything a resume restores (step, optimizer,
    scheduler, data cursor, RNG, with their types) and belong to this folder's step; every
    safetensors file (weights, shards, adapter) must have an intact header and exactly the data it
    promises; every JSON file must parse, and run_config.yaml must be a YAML mapping (and be there
    when state.json says it was written). A CheckpointError names the first bad file; a file the
    system cannot read (permission, I/O error) is an UnreadableCheckpointError naming it. read_tensors
    False checks the trainer state's tensors by their header alone (the state holds them unfilled).
    """
    path = Path(path)
    try:
        return _verified_state(path, read_tensors)
    except FileNotFoundError as e:  # a file gone while it was read
        raise CheckpointError(f"{e.filename or path} is missing: {path} is no complete training checkpoint") from e
    except OSError as e:
        raise UnreadableCheckpointError(unreadable_message(path, e)) from e


def unreadable_message(path: Path, error: OSError) -> str:
    """Why checkpoint `path` cannot be judged: the file the system refused to read, and what to do."""
    file = error.filename or path
    return (
        f"{file} cannot be read ({error.strerror or error}): {path} may be intact, so it is not passed over "
        f"(a resume from an older checkpoint would delete it); make it readable, or move {path} away to "
        "resume from an older checkpoint"
    )


def _verified_state(path: Path, read_tensors: bool) -> dict[str, Any]:
    """verify_checkpoint's checks; an OSError comes out as it is raised."""
    document, state = _read_trainer_state(path, read_tensors)
    _check_resumable(state, path / STATE_DIR / STATE_JSON)
    if document.get("run_config") == RUN_CONFIG and not (path / RUN_CONFIG).is_file():
        raise CheckpointError(f"{path / RUN_CONFIG} is missing: {path} is no complete training checkpoint")
    match = STEP_DIR.match(path.name)
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
    compares the run's config with); a file that cannot be read is an OSError (verify_checkpoint)."""
    if not file.exists():
        return
    try:
        saved = parse_yaml(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{file}: not UTF-8 text (byte {e.start}); truncated or corrupt") from e
    except ConfigError as e:  # "not valid YAML: <problem> (line L, column C)", on one line
        raise CorruptCheckpointError(f"{file}: {e}; the file is truncated or corrupt") from e
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{file}: not a YAML mapping of config sections (found {type(saved).__name__})")


def _legacy_message(path: Path) -> str:
    return (
        f"{path / LEGACY_PICKLE}: a checkpoint of an older minigrpo that stores its trainer state as a "
        "pickle, which is never loaded (unpickling can run arbitrary code); resume from a newer "
        "checkpoint or start a new run from its weights (model.name_or_path)"
    )
