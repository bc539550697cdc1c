"""Projections that read the same input, stored back to back so inference runs them as one GEMM.

q, k and v (and gate and up) all multiply the same activations. In a decode step with few rows
each GEMM is a skinny, memory-bound call whose fixed cost is a large share of its time (on an H100
at 64 rows, Qwen2.5-1.5B: q, k and v as three cuBLAS calls 15.5 us, as one 6.5 us). Checkpoints
keep them as separate matrices, and so does the model (LoRA adapts them one by one, and training
with separate parameters is the same math), so instead of a fused parameter the weights share one
buffer: `pack_rows` moves them into it (the Parameters keep their identity, only their storage
moves), and `joined_rows` sees a packed set as one (sum of outputs, in) matrix, with no copy.

`packed_linear(x, layers)` is what the model calls: one GEMM over the joined matrix when the set is
packed and 16-bit (fp32 models keep bitwise the results of unpacked ones), the layers one by one
otherwise; `joined_linear` gives that GEMM's output whole (the MLP hands [gate | up] to
swiglu_halves, whose gradient is then one tensor, not two joined by a copy). In training its
backward is one GEMM for the input's gradient and one for the joined weight's, whose row blocks
are the parts' gradients (the small k and v GEMMs, N = 256 for Qwen2.5-1.5B, run at a fraction of
the large ones' rate). It checks the storage on every call, so a set that stopped being packed
(moved to another device, sharded, quantised, wrapped by LoRA) falls back by itself. Layers that
run as plain linears only for inference (LoRA merged for sampling: `inference_weights()`,
lora.adapters_frozen) are joined the same way when their copies lie back to back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    return _joined_linear([m.weight.detach() for m in modules], [m.bias for m in modules])


def _joined_linear(
    weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) as views over parts that lie back to back (biases: all of them or none); else None."""
    weight = _joined(weights)
    if weight is None or len({b is None for b in biases}) > 1:
        return None
    if biases[0] is None:
        return weight, None
    bias = _joined([b.detach() for b in biases])
    return None if bias is None else (weight, bias)


class _JoinedLinear(torch.autograd.Function):
    """y = x W^T + b with W, b the joined views of packed parts; the gradient of W is returned in
    row blocks, one per part (the parts are the inputs autograd tracks; the views are not). Frozen
    parts (a LoRA run's untargeted projections) cost what nn.Linear's do: x is kept only when a
    weight trains, and no weight-gradient GEMM runs when none does."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, *parts):
        weights_train = any(ctx.needs_input_grad[4 : 4 + len(sizes)])
        ctx.save_for_backward(x if weights_train else None, weight)
        ctx.sizes = sizes
        return F.linear(x, weight, bias)  # (..., sum N_i)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n = len(ctx.sizes)
        needs_w, needs_b = ctx.needs_input_grad[4 : 4 + n], ctx.needs_input_grad[4 + n :]
        # under autocast the forward ran in dy's dtype: the backward's GEMMs too (the engine casts
        # each gradient back to its input's dtype), as autocast's own linear does
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None  # (..., D)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, sum N_i)
        dws = [None] * n
        if any(needs_w):
            dw = dy2.T @ x.reshape(-1, x.shape[-1]).to(dy.dtype)  # (sum N_i, D)
            dws = [g if need else None for g, need in zip(dw.split(ctx.sizes), needs_w)]
        dbs = [None] * len(needs_b)
        if any(needs_b):
            dbs = [g if need else None for g, need in zip(dy2.sum(0).split(ctx.sizes), needs_b)]
        return dx, None, None, None, *dws, *dbs  # x, the views, sizes, then one gradient per part


def joined_inference_weights(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) over layers that each run as a plain linear right now (`inference_weights()`,
    e.g. LoRA layers merged for sampling, lora.adapters_frozen) with those copies back to back; else None."""
    pairs = [m.inference_weights() if hasattr(m, "inference_weights") else None for m in modules]
    if any(p is None for p in pairs):
        return None
    return _joined_linear([w for w, _ in pairs], [b for _, b in pairs])


def joined_linear(x: torch.Tensor, layers: list[nn.Module], *, join: bool | None = None) -> torch.Tensor | None:
    """The layers' outputs side by side, (..., sum N_i), from one GEMM, when the set runs joined;
    None otherwise (then call the layers one by one, as packed_linear does).

    join: whether a packed set runs as one GEMM (forward, and backward with grad). Default: when its
    weights are 16-bit, i.e. tensor-core GEMMs, where fewer and larger calls pay. fp32 models (the
    references, the exactness tests) keep the separate calls, so their results stay bitwise those
    of an unpacked model (e.g. one process against FSDP shards, which are never packed).
    """
    joined = joined_rows(layers)
    if joined is None and not torch.is_grad_enabled():
        joined = joined_inference_weights(layers)
    if joined is None:
        return None
    weight, bias = joined
    if not (weight.dtype in (torch.bfloat16, torch.float16) if join is None else join):
        return None
    sizes = [layer.out_features for layer in layers]
    params = [layer.weight for layer in layers] + ([layer.bias for layer in layers] if bias is not None else [])
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _JoinedLinear.apply(x, weight, bias, sizes, *params)
    return F.linear(x, weight, bias)


def packed_linear(x: torch.Tensor, layers: list[nn.Module], *, join: bool | None = None) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], as one GEMM when the set runs joined (joined_linear, `join` as there)."""
    y = joined_linear(x, layers, join=join)
    if y is None:
        return [layer(x) for layer in layers]
    return list(y.split([layer.out_features for layer in layers], dim=-1))


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
