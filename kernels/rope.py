"""Rotary position embedding, rotate-half convention (HF Llama/Qwen/Phi).

q: (B, T, H, Dh), k: (B, T, Hkv, Dh); cos, sin: (B, T, R/2) fp32 with R <= Dh the rotary dim
(partial rotary leaves the last Dh - R channels untouched). Pair (i, i + R/2) of each head rotates
by angle theta[b, t, i]:  x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin.
"""

from __future__ import annotations

import torch

from ._triton import resolve_impl


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of x (B, T, H, Dh) by cos/sin (B, T, R/2); fp32 math."""
    half = cos.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    c, s = cos.float().unsqueeze(2), sin.float().unsqueeze(2)  # (B, T, 1, R/2)
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
    return out.to(x.dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, Dh) and k (B, T, Hkv, Dh) by per-row angles cos/sin (B, T, R/2)."""
    path = resolve_impl(impl, q, k)
    if path == "triton":
        raise NotImplementedError("Triton RoPE lands with the kernels work")
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
