"""Training checkpoints: written atomically, the last n kept, a crashed run resumed exactly.

    run_dir/checkpoints/step_000050/
        config.json, model.safetensors, generation_config.json, tokenizer files   an HF checkpoint:
                                                                                  load_pretrained() reads it
        trainer_state.pt      optimizer, scheduler, RNG states, data cursor, step (torch.save)
        trainer_state.json    the same step and cursor, readable
        run_config.yaml       the resolved run config

Any number of ranks. Nothing in a checkpoint depends on how many processes wrote it, so a run saved
by one process resumes on two and vice versa: the model is a whole HF checkpoint (FSDP shards are
gathered tensor by tensor to rank 0, which writes everything), the optimizer state is keyed by
parameter name with whole tensors (`optimizer_state`; a resuming rank takes its shard of each), the
data cursor is the same on every rank (all ranks walk one prompt order), and the RNG states of all
ranks are kept (a resume on as many ranks restores each rank's own; on another number of ranks the
trainer reseeds them; sampling itself uses counter-based noise, not these generators). When the
trainable weights are kept in fp32 while the model computes (and is saved) in bf16 (MasterWeights,
or FSDP's fp32 shards), the fp32 values travel in the optimizer state as "masters".

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

from minigrpo.distributed import full_tensor, shard_like
from minigrpo.models.loading import save_pretrained
from minigrpo.optim import MasterWeights

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
        for i, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def restore_rng(state: dict[str, Any], rank: int, world_size: int) -> bool:
    """Set this rank's RNG states from a checkpoint if it was written by as many ranks (True), else
    leave them (False: the caller reseeds). Checkpoints of one process hold only "rng"."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) != world_size:
        return False
    set_rng_state(per_rank[rank])
    return True


# ------------------------------------------------------------------------------------------------
# optimizer state by parameter name (any number of ranks)


def _trainable(model: torch.nn.Module) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Names and parameters the optimizer steps, in its order (build_optimizer keeps model order)."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


def optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, keep: bool = True, fp32_params: bool = False
) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, with whole tensors on CPU.

    Under FSDP every rank must call this (sharded states are gathered one tensor at a time); only
    ranks with keep=True hold the result. fp32_params: also store the trainable parameters themselves
    as "masters" (FSDP keeps fp32 shards while the saved model is bf16). A MasterWeights optimizer
    stores its fp32 copies there anyway.
    """
    names, params = _trainable(model)
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    sd = inner.state_dict()
    order = [i for group in sd["param_groups"] for i in group["params"]]
    if len(order) != len(names):
        raise ValueError(f"the optimizer steps {len(order)} tensors, the model has {len(names)} trainable ones")

    def whole(v: Any) -> Any:
        if not torch.is_tensor(v):
            return v
        v = full_tensor(v)
        return v.detach().cpu() if keep else None

    state = {
        name: {k: whole(v) for k, v in sd["state"][i].items()} for i, name in zip(order, names) if i in sd["state"]
    }
    out: dict[str, Any] = {
        "format": "by_name",
        "param_names": names,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
        "group_sizes": [len(g["params"]) for g in sd["param_groups"]],
        "state": state,
    }
    if isinstance(optimizer, MasterWeights):
        out["masters"] = {n: m.detach().cpu() for n, m in zip(names, optimizer.masters)}
    elif fp32_params:
        out["masters"] = {n: whole(p.detach().float()) for n, p in zip(names, params)}
    return out if keep else {}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore `optimizer_state` into an optimizer over this process's (possibly sharded) parameters.

    Each rank takes its shard of every saved whole tensor. Checkpoints of earlier versions (a plain
    `optimizer.state_dict()`, keyed by index) load as they are.
    """
    if saved.get("format") != "by_name":
        optimizer.load_state_dict(saved)
        return
    names, params = _trainable(model)
    if names != saved["param_names"]:
        extra, missing = set(saved["param_names"]) - set(names), set(names) - set(saved["param_names"])
        raise ValueError(
            f"the checkpoint's optimizer state is for other parameters: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    masters = optimizer.masters if isinstance(optimizer, MasterWeights) else params
    state = {}
    for i, (name, target) in enumerate(zip(names, masters)):
        if name in saved["state"]:
            state[i] = {
                k: shard_like(v, target) if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in saved["state"][name].items()
            }
    groups, start = [], 0
    for group, size in zip(saved["param_groups"], saved["group_sizes"]):
        groups.append({**group, "params": list(range(start, start + size))})
        start += size
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    inner.load_state_dict({"state": state, "param_groups": groups})
    if isinstance(optimizer, MasterWeights) and "masters" in saved:
        with torch.no_grad():
            for name, m, p in zip(names, optimizer.masters, optimizer.params):
                m.copy_(saved["masters"][name])
                p.copy_(m)


@torch.no_grad()
def load_masters(model: torch.nn.Module, saved_optimizer: dict[str, Any]) -> None:
    """Copy the fp32 "masters" of a saved optimizer state into the model's (unsharded, fp32)
    trainable parameters; nothing if there are none. FSDP runs call this before sharding."""
    params = dict(model.named_parameters())
    for name, value in saved_optimizer.get("masters", {}).items():
        params[name].copy_(value)


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
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    trainer_state: picklable state (optimizer/scheduler state dicts, data cursor, counters); the
    RNG states are added here: this process's as "rng", and `rng_states` (one per rank, gathered by
    the caller) as "rng_per_rank". save_model(model, tokenizer, dir) writes the weights.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp)
    rng = rng_state()
    state = {**trainer_state, "step": step, "rng": rng, "rng_per_rank": rng_states or [rng]}
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
