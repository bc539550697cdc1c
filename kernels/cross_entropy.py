"""Fused LM head + cross-entropy: CE of hidden (N, D) @ weight (V, D).T without (N, V) logits.

    fused_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean",
                               impl="auto") -> loss

CE is -logp, so this is `fused_linear_logprobs` (kernels/logprobs.py: chunked matmul, online
logsumexp, recomputing backward) plus the reduction; gradients flow through the same autograd
function. Semantics follow F.cross_entropy: "none" gives (N,) fp32 with 0 on ignored rows, "sum"
the sum, "mean" the sum over the non-ignored count, except that a mean over no target at all is 0
with zero gradients (torch gives 0 / 0 = NaN, which would poison a sum of micro-batch losses, e.g. a
micro-batch whose targets are all masked). ignore_index=None ignores no target.
"""

from __future__ import annotations

import torch

from .logprobs import _acc, counted, fused_linear_logprobs

_NO_TARGET = -(2**63)  # an ignore_index no token id equals: the reference's ignore_index=None


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int | None = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The spec, unchunked: F.cross_entropy on fp32 logits (fp64 for fp64 inputs, so that it can be the
    fp64 reference). ignore_index=None ignores none. Materialises (N, V) fp32: tests only."""
    logits = _acc(hidden @ weight.T)  # (N, V) fp32
    ignore_index = _NO_TARGET if ignore_index is None else ignore_index
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    impl: str = "auto",
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits hidden (N, D) @ weight (V, D).T against targets (N,), in fp32.

    impl: "auto" (Triton on CUDA, the chunked torch path elsewhere), "triton" or "ref"; tile: see
    fused_linear_logprobs.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss = -fused_linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, impl=impl, tile=tile)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted(targets, ignore_index).sum().clamp(min=1)  # no target: 0, not 0 / 0
