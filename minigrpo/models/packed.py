"""Projections that read the same input, stored back to back so inference runs them as one GEMM.

q, k and v (and gate and up) all multiply the same activations. In a decode step with few rows
each GEMM is a skinny, memory-bound call whose fixed cost is a large share of its time (on an H100
at 64 rows, Qwen2.5-1.5B: q, k and v as three cuBLAS calls 15.5 us, as one 6.5 us). Checkpoints
keep them as separate matrices, and so does the model (LoRA adapts them one by one, and training
with separate parameters is the same math), so instead of a fused parameter the weights share one
buffer: `pack_rows` moves them into it (the Parameters keep their identity, only their storage
moves), and `joined_rows` sees a packed set as one (sum of outputs, in) matrix, with no copy.

Inference only: with grad enabled the model keeps the separate calls, whose gradients land in the
separate parameters. `joined_rows` checks the storage every time, so a set that stopped being
packed (moved to another device, sharded, quantised, wrapped by LoRA) falls back by itself.
"""

from __future__ import annotations

import torch
from torch import nn


def _plain_linears(modules: list[nn.Module]) -> bool:
    """Plain nn.Linear layers with ordinary (not sharded, not quantised) weights of one kind."""
    if not all(type(m) is nn.Linear for m in modules):
        return False
    ref = modules[0].weight
    biased = {m.bias is not None for m in modules}
    return len(biased) == 1 and all(
        type(m.weight.data) is torch.Tensor
        and m.weight.dtype == ref.dtype
        and m.weight.device == ref.device
        and m.weight.shape[1] == ref.shape[1]
        for m in modules
    )


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over `tensors` (each contiguous, same trailing shape) if they lie back to back in
    one storage, in order; else None."""
    first = tensors[0]
    at = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        if t.storage_offset() != at:
            return None
        at += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())  # the same storage, further on


def joined_rows(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (sum N_i, D), bias (sum N_i,) or None) over linears packed by pack_rows, as views of
    their shared storage (no copy; inference only), or None when they are not packed."""
    if not _plain_linears(modules):
        return None
    weight = _joined([m.weight.detach() for m in modules])
    if weight is None:
        return None
    if modules[0].bias is None:
        return weight, None
    bias = _joined([m.bias.detach() for m in modules])
    return None if bias is None else (weight, bias)


@torch.no_grad()
def pack_rows(modules: list[nn.Module]) -> bool:
    """Move the weights (and biases) of plain linears of one input size into one buffer each, back
    to back in order; values, Parameters and their flags unchanged. Returns whether they are packed
    (False for layers it cannot pack: LoRA-wrapped, quantised, sharded)."""
    if not _plain_linears(modules):
        return False
    if joined_rows(modules) is not None:
        return True
    for name in ("weight", "bias"):
        params = [getattr(m, name) for m in modules]
        if params[0] is None:
            continue
        buffer = torch.cat([p.detach() for p in params])  # (sum N_i, ...) one new storage
        at = 0
        for p in params:
            p.data = buffer[at : at + p.shape[0]]
            at += p.shape[0]
    return True
