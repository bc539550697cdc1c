"""A decode step's rotary + KV-cache write in one launch: rotate q and k, write rotary(k) and v at the slot.

    rotary_into_cache(q, k, v, cos, sin, k_cache, v_cache, slot, *, first=0, impl="auto") -> q_rot

q: (B, 1, H, Dh), k, v: (B, 1, Hkv, Dh) (any strides with unit channel stride: views of the
projections); cos, sin: (B, 1, R/2) fp32 (or (1, 1, R/2), broadcast over B); k_cache, v_cache:
(B, Hkv, S_max, Dh), any strides (one layer of KVCache.k, also of a cache whose rows were sliced:
`cache.k[:, :n][layer]`); slot: (1,) int64 device tensor, 0 <= slot < S_max (not checked: that
would sync with the host). Returns rotary(q) as a new contiguous (B, 1, H, Dh) tensor in q.dtype
and writes
    k_cache[:, :, slot - first] = rotary(k),   v_cache[:, :, slot - first] = v
touching nothing else of the caches (`first`: the slot at column 0, e.g. the length of a shared
prefix the cache does not hold; kernels/flash_decode.py). The rotation is exactly `apply_rotary`'s (kernels/rope.py):
rotate-half, pair (i, i + R/2) by theta[b, i], fp32 math, one rounding; channels [R, Dh) pass through.

Why: a decode step (one token per row, replayed from CUDA graphs) otherwise runs, per layer, the
rotary kernel and two index_copy_ kernels before the attention; each tiny launch costs a few us.
Here one launch does all three and k goes straight from the projection into the cache.

Triton path: grid (B,), program b rotates every q head and k head of row b and copies v; `slot` is
read inside the kernel (no host sync, so the launch can be captured in a CUDA graph). Inference
only: with grad enabled and an input that requires grad, the reference runs instead.
"""

from __future__ import annotations

import torch

from ._triton import jit, next_power_of_2, resolve_impl, tl
from .rope import rotary_ref

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec; also the CPU fallback)
# ----------------------------------------------------------------------------------------------


def rotary_into_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    first: int = 0,
) -> torch.Tensor:
    """rotary_ref on q and k, then index_copy_ of rotary(k) and v into the caches at `slot - first`."""
    col = slot - first if first else slot
    k_cache.index_copy_(2, col, rotary_ref(k, cos, sin).transpose(1, 2))  # (B, Hkv, 1, Dh) at the slot
    v_cache.index_copy_(2, col, v.transpose(1, 2))
    return rotary_ref(q, cos, sin)  # (B, 1, H, Dh)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel
# ----------------------------------------------------------------------------------------------


@jit
def _rotary_into_cache_kernel(
    q_ptr,  # (B, 1, H, Dh) input (unit channel stride)
    k_ptr,  # (B, 1, HKV, Dh) input (unit channel stride)
    v_ptr,  # (B, 1, HKV, Dh) input (unit channel stride)
    cos_ptr,  # (B, 1, R2) fp32 (unit stride on R2; batch stride 0 when broadcast)
    sin_ptr,  # (B, 1, R2) fp32
    qo_ptr,  # (B, 1, H, Dh) output, contiguous
    kc_ptr,  # (B, HKV, S_max, Dh) key cache, written at the slot
    vc_ptr,  # (B, HKV, S_max, Dh) value cache, written at the slot
    slot_ptr,  # (1,) int64: the cache slot of this step
    first,  # the slot at column 0 of the caches
    H,
    HKV,
    R2,
    DH,
    stride_q_b,
    stride_q_h,
    stride_k_b,
    stride_k_h,
    stride_v_b,
    stride_v_h,
    stride_qo_b,
    stride_qo_h,
    stride_kc_b,
    stride_kc_h,
    stride_kc_s,
    stride_kc_d,
    stride_vc_b,
    stride_vc_h,
    stride_vc_s,
    stride_vc_d,
    stride_cos_b,
    stride_sin_b,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_REST: tl.constexpr,  # pass-through channels [R, Dh), 0 if R == Dh
    BLOCK_D: tl.constexpr,  # all channels (the v copy)
):
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr).to(tl.int64) - first  # the cache column written
    r = tl.arange(0, BLOCK_R2)
    r_ok = r < R2
    cos = tl.load(cos_ptr + b * stride_cos_b + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_R2)
    sin = tl.load(sin_ptr + b * stride_sin_b + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    for which in tl.static_range(2):  # 0: q into qo, 1: k into the cache (unrolled, own head block)
        if which == 0:
            src, dst, n_heads = q_ptr, qo_ptr, H
            src_row, src_h = b * stride_q_b, stride_q_h
            dst_row, dst_h, dst_d = b * stride_qo_b, stride_qo_h, 1
        else:
            src, dst, n_heads = k_ptr, kc_ptr, HKV
            src_row, src_h = b * stride_k_b, stride_k_h
            dst_row, dst_h, dst_d = b * stride_kc_b + slot * stride_kc_s, stride_kc_h, stride_kc_d
        heads = tl.arange(0, BLOCK_HQ if which == 0 else BLOCK_HK)
        head_ok = (heads < n_heads)[:, None]  # (BLOCK_H, 1)
        src_off = src_row + (heads * src_h)[:, None]  # (BLOCK_H, 1)
        dst_off = dst_row + (heads * dst_h)[:, None]
        mask = head_ok & r_ok[None, :]  # (BLOCK_H, BLOCK_R2)
        x1 = tl.load(src + src_off + r[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + src_off + R2 + r[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(dst + dst_off + r[None, :] * dst_d, o1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + dst_off + (R2 + r[None, :]) * dst_d, o2.to(dst.dtype.element_ty), mask=mask)
        if BLOCK_REST > 0:
            c = 2 * R2 + tl.arange(0, BLOCK_REST)
            rest_mask = head_ok & (c < DH)[None, :]
            rest = tl.load(src + src_off + c[None, :], mask=rest_mask)
            tl.store(dst + dst_off + c[None, :] * dst_d, rest.to(dst.dtype.element_ty), mask=rest_mask)
    heads = tl.arange(0, BLOCK_HK)
    d = tl.arange(0, BLOCK_D)
    v_mask = (heads < HKV)[:, None] & (d < DH)[None, :]  # (BLOCK_HK, BLOCK_D)
    v = tl.load(v_ptr + b * stride_v_b + (heads * stride_v_h)[:, None] + d[None, :], mask=v_mask)
    vc_off = b * stride_vc_b + slot * stride_vc_s + (heads * stride_vc_h)[:, None] + d[None, :] * stride_vc_d
    tl.store(vc_ptr + vc_off, v.to(vc_ptr.dtype.element_ty), mask=v_mask)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotary_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slot, first) -> torch.Tensor:
    """One launch, one program per row (a decode step has B * (H + 2 Hkv) * Dh elements: a few K per row)."""
    q, k, v = _unit_channel_stride(q), _unit_channel_stride(k), _unit_channel_stride(v)
    B, _, H, DH = q.shape
    HKV = k.shape[2]
    R2 = cos.shape[-1]
    cos, sin = _unit_channel_stride(cos.expand(B, 1, R2)), _unit_channel_stride(sin.expand(B, 1, R2))
    qo = torch.empty((B, 1, H, DH), dtype=q.dtype, device=q.device)
    rest = DH - 2 * R2
    _rotary_into_cache_kernel[(B,)](
        q, k, v, cos, sin, qo, k_cache, v_cache, slot, first,
        H, HKV, R2, DH,
        q.stride(0), q.stride(2),
        k.stride(0), k.stride(2),
        v.stride(0), v.stride(2),
        qo.stride(0), qo.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        cos.stride(0), sin.stride(0),
        BLOCK_HQ=next_power_of_2(H), BLOCK_HK=next_power_of_2(HKV), BLOCK_R2=next_power_of_2(R2),
        BLOCK_REST=next_power_of_2(rest) if rest > 0 else 0, BLOCK_D=next_power_of_2(DH),
        num_warps=4,
    )  # fmt: skip
    return qo


def _check_inputs(q, k, v, cos, sin, k_cache, v_cache, slot) -> None:
    """Raise ValueError naming the shapes the write cannot take (asserts would vanish under
    `python -O`, and the kernel would then write outside the caches)."""
    if (
        q.dim() != 4
        or q.shape[1] != 1
        or k.dim() != 4
        or k.shape != v.shape
        or k.shape[:2] != q.shape[:2]
        or k.shape[3] != q.shape[3]
    ):
        raise ValueError(
            f"rotary_into_cache: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, 1, H, Dh), "
            "(B, 1, Hkv, Dh), (B, 1, Hkv, Dh)"
        )
    B, _, _, Dh = q.shape
    Hkv = k.shape[2]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[:2] not in ((B, 1), (1, 1)):
        raise ValueError(f"rotary_into_cache: cos {tuple(cos.shape)}, sin {tuple(sin.shape)} must be "
                         f"({B} or 1, 1, R/2)")  # fmt: skip
    if 2 * cos.shape[-1] > Dh:
        raise ValueError(f"rotary_into_cache: rotary dim {2 * cos.shape[-1]} > head dim {Dh}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[:2] != (B, Hkv) or k_cache.shape[3] != Dh:
        raise ValueError(
            f"rotary_into_cache: k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)} must both be "
            f"({B}, {Hkv}, S_max, {Dh}) for k {tuple(k.shape)}"
        )
    if slot.numel() != 1 or slot.dtype.is_floating_point:
        raise ValueError(f"rotary_into_cache: slot must be one integer index, got {tuple(slot.shape)} {slot.dtype}")


def _check_triton_dtypes(q, k, v, k_cache, v_cache) -> None:
    """Raise ValueError where the kernel cannot take the dtypes (the reference's index_copy_ would not either)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"rotary_into_cache: no Triton path for {q.dtype} (fp16, bf16, fp32); use impl='ref'")
    if not k.dtype == v.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(
            f"rotary_into_cache: k {k.dtype}, v {v.dtype} and the caches {k_cache.dtype}, {v_cache.dtype} must share "
            "one dtype"
        )


# ----------------------------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------------------------


def rotary_into_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    *,
    first: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """Rotate q (B, 1, H, Dh) and k (B, 1, Hkv, Dh) by cos/sin (B, 1, R/2); write rotary(k) and v
    (B, 1, Hkv, Dh) into k_cache/v_cache (B, Hkv, S_max, Dh) at column `slot - first` (slot (1,));
    return rotary(q).

    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "ref". Inference only.
    """
    _check_inputs(q, k, v, cos, sin, k_cache, v_cache, slot)
    path = resolve_impl(impl, q, k, v, k_cache, v_cache, slot)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, cos, sin))
    if path == "ref" or needs_grad or q.numel() == 0:
        return rotary_into_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slot, first)
    _check_triton_dtypes(q, k, v, k_cache, v_cache)
    return _rotary_into_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slot, first)
