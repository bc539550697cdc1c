"""Optimizer state keyed by parameter name, with whole tensors: saved by one process, resumed by any number.

A torch optimizer's state_dict numbers its parameters, and under FSDP each rank holds only shards of
the moments. A checkpoint instead keys the state by parameter name and stores whole tensors on the
CPU (`optimizer_state`); a resuming rank takes its shard of each (`load_optimizer_state`). When the
trainable weights are kept in fp32 while the model computes (and is saved) in bf16 (MasterWeights,
or FSDP's fp32 shards), the fp32 values travel along as "masters".
"""

from __future__ import annotations

from typing import Any

import torch

from minigrpo.distributed import full_tensor, shard_like
from minigrpo.optim import MasterWeights


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
        return v.detach().to("cpu", copy=True) if keep else None  # a snapshot, also of CPU tensors

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
        out["masters"] = {n: m.detach().to("cpu", copy=True) for n, m in zip(names, optimizer.masters)}
    elif fp32_params:
        out["masters"] = {n: whole(p.detach().float()) for n, p in zip(names, params)}
    return out if keep else {}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore `optimizer_state` into an optimizer over this process's (possibly sharded) parameters.

    Each rank takes its shard of every saved whole tensor. A plain `optimizer.state_dict()` (keyed
    by index) loads as it is.
    """
    if saved.get("format") != "by_name":
        optimizer.load_state_dict(saved)
        return
    names, params = _trainable(model)
    masters = optimizer.masters if isinstance(optimizer, MasterWeights) else params
    difference = _layout_difference(names, masters, saved)
    if difference:
        raise ValueError(f"the checkpoint's optimizer state is for other parameters: {difference}")
    state = {}
    for i, (name, target) in enumerate(zip(names, masters)):
        if name in saved["state"]:
            state[i] = {
                k: shard_like(v, target) if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in saved["state"][name].items()
            }
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    # how this process steps (fused on CUDA, foreach elsewhere) wins over how the saving one did
    live = {k: v for k, v in inner.param_groups[0].items() if k in ("foreach", "fused")}
    groups, start = [], 0
    for group, size in zip(saved["param_groups"], saved["group_sizes"]):
        groups.append({**group, **live, "params": list(range(start, start + size))})
        start += size
    inner.load_state_dict({"state": state, "param_groups": groups})
    if isinstance(optimizer, MasterWeights) and "masters" in saved:
        with torch.no_grad():
            for name, m, p in zip(names, optimizer.masters, optimizer.params):
                m.copy_(saved["masters"][name])
                p.copy_(m)


def _layout_difference(names: list[str], targets: list[torch.Tensor], saved: dict[str, Any]) -> str | None:
    """What differs between the parameters stepped here (names, and the tensors the state belongs to:
    masters or parameters, whole or sharded) and those a saved state was written for; None if nothing.
    Checked before anything loads: torch's load_state_dict takes moments of any shape, and a master
    copied into a parameter of another shape broadcasts, so a mismatch would corrupt the weights or
    surface steps later as a shape error inside the optimizer."""
    saved_names = saved["param_names"]
    if names != saved_names:
        extra, missing = set(saved_names) - set(names), set(names) - set(saved_names)
        if not extra and not missing:
            i = next(i for i, (a, b) in enumerate(zip(names, saved_names)) if a != b)
            return f"the same names in another order (position {i}: {names[i]} here, {saved_names[i]} saved)"
        return f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    if sum(saved["group_sizes"]) != len(names):
        return f"its parameter groups hold {sum(saved['group_sizes'])} tensors, not {len(names)}"
    for name, target in zip(names, targets):
        entries = [(k, v) for k, v in saved["state"].get(name, {}).items() if torch.is_tensor(v) and v.dim() > 0]
        entries += [("master", saved["masters"][name])] if name in saved.get("masters", {}) else []
        for key, value in entries:
            if tuple(value.shape) != tuple(target.shape):
                return f"{name} is {tuple(target.shape)} here, its saved {key} {tuple(value.shape)}"
    return None


@torch.no_grad()
def load_masters(model: torch.nn.Module, saved_optimizer: dict[str, Any]) -> None:
    """Copy the fp32 "masters" of a saved optimizer state into the model's (unsharded, fp32)
    trainable parameters; nothing if there are none. FSDP runs call this before sharding."""
    params = dict(model.named_parameters())
    for name, value in saved_optimizer.get("masters", {}).items():
        params[name].copy_(value)
