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

# bitsandbytes' 8-bit state: quantisation maps and block scales, not one value per parameter element
_NOT_PER_ELEMENT = frozenset(
    {"qmap1", "qmap2", "absmax1", "absmax2", "max1", "max2", "new_max1", "new_max2", "gnorm_vec", "unorm_vec"}
)


def _stepped(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], list[torch.Tensor]]:
    """Names of the parameters the optimizer steps and the tensors its state belongs to (masters or the
    parameters), in the optimizer's order, matched by identity: that order need not be the model's."""
    owner = {id(p): n for n, p in model.named_parameters()}
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    param_of = dict(zip(map(id, optimizer.masters), optimizer.params)) if inner is not optimizer else {}
    names, targets = [], []
    for group in inner.param_groups:
        for t in group["params"]:
            name = owner.get(id(param_of.get(id(t), t)))
            if name is None:
                raise ValueError(f"the optimizer steps a {tuple(t.shape)} tensor that is no parameter of the model")
            names.append(name)
            targets.append(t)
    return names, targets


def _per_element(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of the state entries with one value per parameter element (Adam's moments,
    8-bit AdamW's state1/state2 in its nested dict), the ones a shape check and sharding concern."""
    found = []
    for k, v in state.items():
        if isinstance(v, dict):
            found += _per_element(v)
        elif torch.is_tensor(v) and _is_per_element(k, v):
            found.append((k, v))
    return found


def _layout(optimizer: torch.optim.Optimizer) -> str:
    """Whose state layout an optimizer keeps: bitsandbytes' 8-bit one or torch's (exp_avg, exp_avg_sq)."""
    return "bitsandbytes" if type(optimizer).__module__.startswith("bitsandbytes") else "torch"


def _saved_layout(state: dict[str, dict[str, Any]]) -> str | None:
    """The layout of a saved state by name, read from its entries; None when nothing was stepped yet."""
    for entry in state.values():
        if "__bnb_optimizer_quant_state__" in entry or "state1" in entry:
            return "bitsandbytes"
        if "exp_avg" in entry:
            return "torch"
    return None


def _is_per_element(key: str, value: torch.Tensor) -> bool:
    return value.dim() > 0 and key not in _NOT_PER_ELEMENT


def _shard_entry(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A saved whole state tensor as this process steps it: a per-element one laid out like its target."""
    return shard_like(value, target) if _is_per_element(key, value) else value


def _map_tensors(state: dict[str, Any], fn) -> dict[str, Any]:
    """`state` with fn(key, tensor) applied to every tensor, nested dicts included (8-bit AdamW's)."""
    out = {}
    for k, v in state.items():
        out[k] = _map_tensors(v, fn) if isinstance(v, dict) else fn(k, v) if torch.is_tensor(v) else v
    return out


def optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, keep: bool = True, fp32_params: bool = False
) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, with whole tensors on CPU.

    Under FSDP every rank must call this (sharded states are gathered one tensor at a time); only
    ranks with keep=True hold the result. fp32_params: also store the trainable parameters themselves
    as "masters" (FSDP keeps fp32 shards while the saved model is bf16). A MasterWeights optimizer
    stores its fp32 copies there anyway.
    """
    names, targets = _stepped(model, optimizer)
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    sd = inner.state_dict()
    order = [i for group in sd["param_groups"] for i in group["params"]]  # the same order as names

    def whole(_key: str, v: torch.Tensor) -> torch.Tensor | None:
        v = full_tensor(v)
        return v.detach().to("cpu", copy=True) if keep else None  # a snapshot, also of CPU tensors

    state = {name: _map_tensors(sd["state"][i], whole) for i, name in zip(order, names) if i in sd["state"]}
    out: dict[str, Any] = {
        "format": "by_name",
        "optimizer": type(inner).__name__,
        "param_names": names,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
        "group_sizes": [len(g["params"]) for g in sd["param_groups"]],
        "state": state,
    }
    if isinstance(optimizer, MasterWeights):
        out["masters"] = {n: m.detach().to("cpu", copy=True) for n, m in zip(names, targets)}
    elif fp32_params:
        out["masters"] = {n: whole(n, p.detach().float()) for n, p in zip(names, targets)}
    return out if keep else {}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore `optimizer_state` into an optimizer over this process's (possibly sharded) parameters.

    Each rank takes its shard of every saved whole tensor. A plain `optimizer.state_dict()` (keyed
    by index) loads as it is.
    """
    if saved.get("format") != "by_name":
        optimizer.load_state_dict(saved)
        return
    names, targets = _stepped(model, optimizer)
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    layout = _saved_layout(saved["state"])
    if layout not in (None, _layout(inner)):
        raise ValueError(
            f"the checkpoint's optimizer state has {layout}'s layout ({saved.get('optimizer', 'another optimizer')}), "
            f"this run steps {type(inner).__name__}: resume with the train.optimizer it was saved with"
        )
    difference = _layout_difference(names, targets, saved)
    if difference:
        raise ValueError(f"the checkpoint's optimizer state is for other parameters: {difference}")
    state = {}
    for i, (name, target) in enumerate(zip(names, targets)):
        if name in saved["state"]:
            state[i] = _map_tensors(saved["state"][name], lambda k, v, t=target: _shard_entry(k, v, t))
    # how this process steps (fused on CUDA, foreach elsewhere) wins over how the saving one did
    live = {k: v for k, v in inner.param_groups[0].items() if k in ("foreach", "fused")}
    groups, start = [], 0
    for group, size in zip(saved["param_groups"], saved["group_sizes"]):
        groups.append({**group, **live, "params": list(range(start, start + size))})
        start += size
    inner.load_state_dict({"state": state, "param_groups": groups})
    if isinstance(optimizer, MasterWeights) and "masters" in saved:
        with torch.no_grad():
            for name, m in zip(names, targets):
                m.copy_(saved["masters"][name])
            for m, p in zip(optimizer.masters, optimizer.params):
                p.copy_(m)
    elif "masters" in saved:
        _load_masters_into_fp32_params(names, targets, saved["masters"])


@torch.no_grad()
def _load_masters_into_fp32_params(names: list[str], params: list[torch.Tensor], masters: dict) -> None:
    """A 16-bit run's fp32 masters, resumed by a run that steps its parameters themselves: into each
    fp32 parameter, which holds only the 16-bit rounding of the saved weights (run.dtype "auto" is
    bf16 on CUDA and fp32 on the CPU, and run.device may change on resume). Sharded (FSDP) parameters
    took them before sharding (load_masters) and are left as they are."""
    from torch.distributed.tensor import DTensor

    for name, p in zip(names, params):
        if name in masters and p.dtype == torch.float32 and not isinstance(p, DTensor):
            p.copy_(masters[name])


def _layout_difference(names: list[str], targets: list[torch.Tensor], saved: dict[str, Any]) -> str | None:
    """What differs between the parameters stepped here (names, and the tensors the state belongs to:
    masters or parameters, whole or sharded) and those a saved state was written for; None if nothing.
    Checked before anything loads: torch's load_state_dict takes moments of any shape, and a master
    copied into a parameter of another shape broadcasts, so a mismatch would corrupt the weights or
    surface steps later as a shape error inside the optimizer."""
    saved_names = saved["param_names"]
    if names != saved_names:
        return _names_difference(names, saved_names)
    if sum(saved["group_sizes"]) != len(names):
        return f"its parameter groups hold {sum(saved['group_sizes'])} tensors, not {len(names)}"
    for name, target in zip(names, targets):
        entries = _per_element(saved["state"].get(name, {}))
        entries += [("master", saved["masters"][name])] if name in saved.get("masters", {}) else []
        for key, value in entries:
            if tuple(value.shape) != tuple(target.shape):
                return f"{name} is {tuple(target.shape)} here, its saved {key} {tuple(value.shape)}"
    return None


def _names_difference(names: list[str], saved_names: list[str]) -> str:
    """How the names of the parameters stepped here differ from those a state was saved for: those
    trainable on one side only (parameters frozen or unfrozen since, another model), or the order."""
    here, there = set(names), set(saved_names)
    here_only = [n for n in names if n not in there]  # in the optimizer's order, as the state lists them
    saved_only = [n for n in saved_names if n not in here]
    if not here_only and not saved_only:
        i = next(i for i, (a, b) in enumerate(zip(names, saved_names)) if a != b)
        return f"the same names in another order (position {i}: {names[i]} here, {saved_names[i]} saved)"
    parts = [f"trainable here, not saved: {_some(here_only)}"] if here_only else []
    parts += [f"saved, not trainable here: {_some(saved_only)}"] if saved_only else []
    return f"{'; '.join(parts)} (the trainable parameters must be those the checkpoint was saved with)"


def _some(names: list[str], most: int = 3) -> str:
    """The first `most` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


@torch.no_grad()
def load_masters(model: torch.nn.Module, saved_optimizer: dict[str, Any]) -> None:
    """Copy the fp32 "masters" of a saved optimizer state into the model's (unsharded, fp32)
    trainable parameters; nothing if there are none. FSDP runs call this before sharding. Masters of
    other names or shapes are refused before any is copied (a (1, D) master copied into a (V, D) weight
    would broadcast over it, and the shape check of load_optimizer_state comes only after)."""
    params = dict(model.named_parameters())
    masters = saved_optimizer.get("masters", {})
    for name, value in masters.items():
        problem = None if name in params else f"{name} is no parameter here"
        if problem is None and tuple(value.shape) != tuple(params[name].shape):
            problem = f"{name} is {tuple(params[name].shape)} here, {tuple(value.shape)} saved"
        if problem:
            raise ValueError(f"the checkpoint's fp32 masters are for other parameters: {problem}")
    for name, value in masters.items():
        params[name].copy_(value)
