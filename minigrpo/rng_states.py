"""The random generators a training step draws from, captured and restored for exact resumes.

A step draws from Python's `random`, numpy's global generator and torch's (CPU, and each CUDA
device's): LoRA dropout, reward functions, shuffles. A checkpoint keeps the state of every one on
every rank, so a resume on as many ranks continues each rank's streams where they stopped.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch (CPU), Python, numpy, and CUDA when there is one."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back an `rng_state()` (CUDA states only for the devices this machine has)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        for i, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def restore_rng(state: dict[str, Any], rank: int, world_size: int) -> bool:
    """Set this rank's RNG states from a checkpoint's trainer state if it was written by as many ranks
    (True), else leave them (False: the caller reseeds)."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) != world_size:
        return False
    set_rng_state(per_rank[rank])
    return True
