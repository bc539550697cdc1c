"""RMSNorm  y = x * rsqrt(mean(x^2) + eps) * w.   x: (..., D); w: (D,); statistics in fp32.

Optionally fused with the residual add: h = x + residual; y = rmsnorm(h); returns (y, h).
"""

from __future__ import annotations

import torch

from ._triton import resolve_impl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The spec: fp32 statistics, HF cast order (normalise in fp32, cast to x.dtype, then scale)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (..., D). With `residual`, returns (rms_norm(x + residual), x + residual)."""
    path = resolve_impl(impl, x, weight)
    if path == "triton":
        raise NotImplementedError("Triton RMSNorm lands with the kernels work")
    if residual is None:
        return rms_norm_ref(x, weight, eps)
    h = x + residual
    return rms_norm_ref(h, weight, eps), h
