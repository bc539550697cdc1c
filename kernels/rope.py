"""Rotary position embedding, rotate-half convention (HF Llama/Qwen/Phi).

    apply_rotary(q, k, cos, sin, *, impl="auto") -> (q_rot, k_rot)

q: (B, T, H, Dh), k: (B, T, Hkv, Dh), any strides (views of a fused qkv projection are fine);
cos, sin: (B, T, R/2) fp32 (or (1, T, R/2), broadcast over B), with R <= Dh the rotary dim: partial
rotary leaves the last Dh - R channels untouched. Angles are per row (b, t), so left-padded batches
pass their own positions. Pair (i, i + R/2) of each head rotates by theta[b, t, i]:
    x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin        (fp32 math, one rounding to q.dtype)
The backward is the inverse rotation (sin -> -sin). Outputs are new contiguous tensors.

Triton path: one launch rotates q and k together; each program takes BLOCK_T rows, loads their
cos/sin once and rotates every head of q, then of k.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, next_power_of_2, resolve_impl, tl

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec; also the CPU fallback)
# ----------------------------------------------------------------------------------------------


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of x (B, T, H, Dh) by cos/sin (B, T, R/2); fp32 math (fp64 for fp64)."""
    half = cos.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    c, s = cos.to(acc).unsqueeze(2), sin.to(acc).unsqueeze(2)  # (B, T, 1, R/2)
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel
# ----------------------------------------------------------------------------------------------


@jit
def _rotary_kernel(
    q_ptr,  # (B, T, H, Dh) input (unit channel stride)
    k_ptr,  # (B, T, HKV, Dh) input
    cos_ptr,  # (B, T, R2) fp32
    sin_ptr,  # (B, T, R2) fp32
    qo_ptr,  # (B, T, H, Dh) output
    ko_ptr,  # (B, T, HKV, Dh) output
    BT,
    T,
    H,
    HKV,
    R2,
    DH,
    stride_q_b,
    stride_q_t,
    stride_q_h,
    stride_k_b,
    stride_k_t,
    stride_k_h,
    stride_qo_b,
    stride_qo_t,
    stride_qo_h,
    stride_ko_b,
    stride_ko_t,
    stride_ko_h,
    stride_cos_b,
    stride_cos_t,
    stride_sin_b,
    stride_sin_t,
    CONJ: tl.constexpr,  # rotate by -theta (the backward)
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_REST: tl.constexpr,  # pass-through channels [R, Dh), 0 if R == Dh
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) flat b * T + t
    row_ok = rows < BT
    b = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    r = tl.arange(0, BLOCK_R2)
    cs_mask = row_ok[:, None] & (r < R2)[None, :]
    cos = tl.load(cos_ptr + (b * stride_cos_b + t * stride_cos_t)[:, None] + r[None, :], mask=cs_mask)
    sin = tl.load(sin_ptr + (b * stride_sin_b + t * stride_sin_t)[:, None] + r[None, :], mask=cs_mask)
    cos = cos.to(tl.float32)[:, None, :]  # (BLOCK_T, 1, BLOCK_R2)
    sin = sin.to(tl.float32)[:, None, :]
    if CONJ:
        sin = -sin
    for which in tl.static_range(2):  # 0: q, 1: k (unrolled; each pass has its own head block)
        if which == 0:
            src, dst, n_heads = q_ptr, qo_ptr, H
            src_row = b * stride_q_b + t * stride_q_t
            dst_row = b * stride_qo_b + t * stride_qo_t
            src_h, dst_h = stride_q_h, stride_qo_h
        else:
            src, dst, n_heads = k_ptr, ko_ptr, HKV
            src_row = b * stride_k_b + t * stride_k_t
            dst_row = b * stride_ko_b + t * stride_ko_t
            src_h, dst_h = stride_k_h, stride_ko_h
        heads = tl.arange(0, BLOCK_HQ if which == 0 else BLOCK_HK)
        head_mask = row_ok[:, None, None] & (heads < n_heads)[None, :, None]
        src_off = src_row[:, None, None] + (heads * src_h)[None, :, None]  # (BLOCK_T, BLOCK_H, 1)
        dst_off = dst_row[:, None, None] + (heads * dst_h)[None, :, None]
        mask = head_mask & (r < R2)[None, None, :]
        x1 = tl.load(src + src_off + r[None, None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + src_off + R2 + r[None, None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(dst + dst_off + r[None, None, :], o1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + dst_off + R2 + r[None, None, :], o2.to(dst.dtype.element_ty), mask=mask)
        if BLOCK_REST > 0:
            c = 2 * R2 + tl.arange(0, BLOCK_REST)
            rest_mask = head_mask & (c < DH)[None, None, :]
            rest = tl.load(src + src_off + c[None, None, :], mask=rest_mask)
            tl.store(dst + dst_off + c[None, None, :], rest, mask=rest_mask)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _config(H: int, HKV: int, R2: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, num_warps): at least 2K rotated q elements per program.

    On an H100 one row per program and 4 warps was best for 32/8 and 12/2 heads of 128 (97% of
    copy bandwidth for fwd+bwd); more rows or warps per program lost up to 8%.
    """
    block_hq, block_hk = next_power_of_2(H), next_power_of_2(HKV)
    per_row = block_hq * 2 * next_power_of_2(R2)
    return max(1, min(16, 2048 // per_row)), block_hq, block_hk, 4


def _rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, conj: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, Dh) and k (B, T, HKV, Dh) into new contiguous tensors (one launch)."""
    q, k = _unit_channel_stride(q), _unit_channel_stride(k)
    B, T, H, DH = q.shape
    HKV = k.shape[2]
    R2 = cos.shape[-1]
    cos, sin = _unit_channel_stride(cos.expand(B, T, R2)), _unit_channel_stride(sin.expand(B, T, R2))
    qo = torch.empty((B, T, H, DH), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, T, HKV, DH), dtype=k.dtype, device=k.device)
    block_t, block_hq, block_hk, num_warps = _config(H, HKV, R2)
    rest = DH - 2 * R2
    _rotary_kernel[(cdiv(B * T, block_t),)](
        q, k, cos, sin, qo, ko,
        B * T, T, H, HKV, R2, DH,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2),
        ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        CONJ=conj, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_R2=next_power_of_2(R2), BLOCK_REST=next_power_of_2(rest) if rest > 0 else 0,
        num_warps=num_warps,
    )  # fmt: skip
    return qo, ko


# ----------------------------------------------------------------------------------------------
# 4. Autograd
# ----------------------------------------------------------------------------------------------


class RotaryFunction(torch.autograd.Function):
    """(q, k) -> (rotate(q), rotate(k)); the backward rotates the gradients back (sin -> -sin)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)
        return _rotary(q, k, cos, sin, conj=False)

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        if dqo is None:  # only k's output was used
            dqo = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=cos.device)
        if dko is None:
            dko = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=cos.device)
        dq, dk = _rotary(dqo, dko, cos, sin, conj=True)
        return dq, dk, None, None


# ----------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Refuse shapes the rotation does not take, naming them: q (B, T, H, Dh), k (B, T, Hkv, Dh),
    cos and sin (B or 1, T, R/2) with R <= Dh."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)} must be (B, T, H, Dh), (B, T, Hkv, Dh)")
    B, T, _, Dh = q.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1] != T or cos.shape[0] not in (1, B):
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)}, sin {tuple(sin.shape)} must be ({B} or 1, {T}, R/2)")
    if 2 * cos.shape[-1] > Dh:
        raise ValueError(f"apply_rotary: rotary dim {2 * cos.shape[-1]} > head dim {Dh}")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, Dh) and k (B, T, Hkv, Dh) by per-row angles cos/sin (B, T, R/2) fp32.

    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "ref".
    """
    _check_shapes(q, k, cos, sin)
    path = resolve_impl(impl, q, k)
    if path == "ref" or q.numel() == 0 or torch.float64 in (q.dtype, k.dtype):  # fp64: the kernel computes in fp32
        return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    return RotaryFunction.apply(q, k, cos, sin)
