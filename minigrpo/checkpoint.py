"""Training checkpoints: written atomically, the last n kept, a crashed run resumed exactly.

    run_dir/checkpoints/step_000050/
        config.json, model.safetensors, generation_config.json, tokenizer files   an HF checkpoint:
                                                                                  load_pretrained() reads it
        trainer_state.pt      optimizer, scheduler, RNG states, data cursor, step (torch.save)
        trainer_state.json    the same step and cursor, readable
        run_config.yaml       the resolved run config

A checkpoint is written into a hidden temporary folder, every file is fsync'ed, and the folder is
renamed into place (an atomic step on POSIX file systems): a run killed at any moment leaves either
the previous checkpoints or the new one, never a half-written one. Resuming restores every piece of
state a step depends on, so a resumed deterministic run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from minigrpo.models.loading import save_pretrained

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "trainer_state.pt").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    trainer_state: picklable state (optimizer/scheduler state dicts, data cursor, counters); the
    RNG states are added here. save_model(model, tokenizer, dir) writes the weights.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp)
    state = {**trainer_state, "step": step, "rng": rng_state()}
    torch.save(state, tmp / "trainer_state.pt")
    readable = {"step": step, **{k: v for k, v in trainer_state.items() if k in ("data", "epoch", "metrics")}}
    (tmp / "trainer_state.json").write_text(json.dumps(readable, indent=2, default=str) + "\n")
    if run_config is not None:
        (tmp / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    _fsync_tree(tmp)
    if final.exists():  # a step saved twice (e.g. a resumed run): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (RNG states are restored by the caller)."""
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
