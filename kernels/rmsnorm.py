"""RMSNorm  y = w * cast(x * rsqrt(mean(x^2) + eps)).   x: (..., D); w: (D,); statistics in fp32.

HF cast order: normalise in fp32, cast to x.dtype, then multiply by w (y has the promoted dtype
of x and w). Optionally fused with the residual add: h = x + residual (in the promoted dtype of
the two, as torch adds them); y = rmsnorm(h); returns (y, h), and the gradient of h flows back
into x and residual.

Triton path: one forward launch (rows in tiles of BLOCK_M x BLOCK_D, rstd (M,) fp32 saved), one
backward launch on a persistent grid. Each backward program owns a contiguous run of rows and keeps
its dw partial sum in fp32 registers; a small kernel then sums the partials (P, D) fp32 over P as
a fixed tree, so dw is bitwise reproducible on a given GPU (no atomics).
"""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, next_power_of_2, num_programs_per_wave, resolve_impl, tl

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec; also the CPU fallback)
# ----------------------------------------------------------------------------------------------


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The spec: fp32 statistics, HF cast order (normalise in fp32, cast to x.dtype, then scale),
    the product in the promoted dtype of x and weight, rounded once to out_dtype (default: that).

    fp64 inputs keep fp64 math, so that the spec doubles as the high-precision reference.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * (xf * rstd).to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
# ----------------------------------------------------------------------------------------------


@jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (M, D) input rows
    r_ptr,  # (M, D) residual rows (read only if HAS_RESIDUAL)
    w_ptr,  # (D,) weight
    y_ptr,  # (M, D) output
    h_ptr,  # (M, D) output x + residual (written only if HAS_RESIDUAL)
    rstd_ptr,  # (M,) fp32 output: 1 / rms of each row, for the backward
    M,
    D,
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_h_row,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64 * stride_r_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # rounded like torch's x + residual
        tl.store(h_ptr + rows64 * stride_h_row + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (BLOCK_M,) fp32
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: cast before the scale
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = n * w[None, :]
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (M, D) gradient of y
    x_ptr,  # (M, D) the rows that were normalised (x, or h = x + residual)
    w_ptr,  # (D,) weight
    rstd_ptr,  # (M,) fp32 saved by the forward
    dh_ptr,  # (M, D) gradient of the returned h (read only if HAS_DH)
    dx_ptr,  # (M, D) output: gradient of x (and of residual)
    dw_part_ptr,  # (P, D) fp32 output: this program's share of dw
    M,
    D,
    stride_dy_row,
    stride_x_row,
    stride_dh_row,
    stride_dx_row,
    HAS_DH: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = pid * ROWS_PER_PROGRAM + r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dn = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dn - xhat * mean(dn * xhat))
        c = tl.sum(dn * xhat, axis=1) / D
        dx = rstd[:, None] * (dn - xhat * c[:, None])
        if HAS_DH:
            dx += tl.load(dh_ptr + rows64 * stride_dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows64 * stride_dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
    tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


@jit
def _rms_norm_dw_kernel(
    part_ptr,  # (P, D) fp32 per-program partial sums of dw
    dw_ptr,  # (D,) output, in the weight's dtype
    P,
    D,
    BLOCK_P: tl.constexpr,  # >= P: the whole column is summed at once, as a fixed tree
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    parts = tl.arange(0, BLOCK_P)
    mask = (parts < P)[:, None] & (cols < D)[None, :]
    acc = tl.load(part_ptr + parts[:, None].to(tl.int64) * D + cols[None, :], mask=mask, other=0.0)
    tl.store(dw_ptr + cols, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=cols < D)


# ----------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """View t as (M, D) rows with unit column stride, copying only if no such view exists."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _fwd_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): tiles of about 4K elements, 16 per thread."""
    block_d = next_power_of_2(D)
    block_m = max(1, min(16, 4096 // block_d))
    return block_m, block_d, max(4, min(16, block_m * block_d // 512))


def _bwd_config(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps, programs per SM) of the persistent backward.

    On an H100 (16K x 4096 bf16) one row at a time, 8 warps and 2 programs per SM was best:
    88% of copy bandwidth; 1 program per SM lost 25%, 2 rows per step 10%, prefetching the next
    row through a pipelined loop nothing.
    """
    block_d = next_power_of_2(D)
    block_m = max(1, min(16, 2048 // block_d))
    return block_m, block_d, max(4, min(8, block_m * block_d // 256)), 2


def _rms_norm_fwd(
    x: torch.Tensor, w: torch.Tensor, r: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x, r: (M, D) rows; returns y (M, D) in out_dtype (default: x's and w's promoted), h (M, D)
    or None, rstd (M,) fp32."""
    M, D = x.shape
    y = torch.empty((M, D), dtype=out_dtype or torch.promote_types(x.dtype, w.dtype), device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if r is not None else None
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_m, block_d, num_warps = _fwd_config(D)
    _rms_norm_fwd_kernel[(cdiv(M, block_m),)](
        x,
        r if r is not None else x,
        w,
        y,
        h if h is not None else y,
        rstd,
        M,
        D,
        x.stride(0),
        (r if r is not None else x).stride(0),
        y.stride(0),
        (h if h is not None else y).stride(0),
        eps,
        HAS_RESIDUAL=r is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, h, rstd


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x, dh: (M, D); returns dx (M, D) in x.dtype and dw (D,) in w.dtype."""
    M, D = x.shape
    block_m, block_d, num_warps, per_sm = _bwd_config(D)
    # a power of two rows per program (few compiled variants), about per_sm programs per SM
    rows_per_program = max(block_m, next_power_of_2(cdiv(M, per_sm * num_programs_per_wave(x.device))))
    programs = cdiv(M, rows_per_program)
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((programs, D), dtype=torch.float32, device=x.device)  # (P, D) fp32
    _rms_norm_bwd_kernel[(programs,)](
        dy,
        x,
        w,
        rstd,
        dh if dh is not None else dy,
        dx,
        dw_part,
        M,
        D,
        dy.stride(0),
        x.stride(0),
        (dh if dh is not None else dy).stride(0),
        dx.stride(0),
        HAS_DH=dh is not None,
        ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return dx, _reduce_partials(dw_part, w.dtype)


def _reduce_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum (P, D) fp32 partials over P in a fixed order (one launch), cast to dtype: (D,)."""
    P, D = part.shape
    block_p = next_power_of_2(P)
    if block_p > 1024:  # more partials than one program holds: torch's (also deterministic) sum
        return part.sum(0).to(dtype)
    out = torch.empty(D, dtype=dtype, device=part.device)
    block_d = max(1, min(64, 16384 // block_p))
    _rms_norm_dw_kernel[(cdiv(D, block_d),)](part, out, P, D, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=8)
    return out


# ----------------------------------------------------------------------------------------------
# 4. Autograd
# ----------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """rms_norm on (M, D) rows; with a residual, returns (y, h) and routes dh into dx."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, out_dtype=None):
        y, h, rstd = _rms_norm_fwd(x, weight, residual, eps, out_dtype)
        ctx.save_for_backward(h if h is not None else x, weight, rstd)
        ctx.has_residual = residual is not None
        return y if h is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, weight, rstd = ctx.saved_tensors
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        if dh is not None and dh.stride(1) != 1:
            dh = dh.contiguous()
        dx, dw = _rms_norm_bwd(dy, x, weight, rstd, dh)
        return dx, dw, (dx if ctx.has_residual else None), None, None


# ----------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (..., D) with weight (D,). With `residual` (same shape as x), returns
    (rms_norm(x + residual), x + residual): the pre-norm block's fused residual add.
    out_dtype: y's dtype (default x's and weight's promoted one, as HF); an fp32 weight over bf16
    rows with out_dtype bf16 scales in fp32 and rounds once.

    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "ref".
    """
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x (..., {D})")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    path = resolve_impl(impl, x, weight)
    dtypes = (x.dtype, weight.dtype, x.dtype if residual is None else residual.dtype)
    if path == "ref" or x.numel() == 0 or torch.float64 in dtypes:  # fp64: the kernels compute in fp32
        if residual is None:
            return rms_norm_ref(x, weight, eps, out_dtype)
        h = x + residual
        return rms_norm_ref(h, weight, eps, out_dtype), h
    weight = weight.contiguous()  # the kernels read it with unit stride
    if residual is None:
        return RMSNormFunction.apply(_rows(x, D), weight, None, eps, out_dtype).view(x.shape)
    h_dtype = torch.promote_types(x.dtype, residual.dtype)  # torch's x + residual, which is normalised
    y, h = RMSNormFunction.apply(_rows(x.to(h_dtype), D), weight, _rows(residual.to(h_dtype), D), eps, out_dtype)
    return y.view(x.shape), h.view(x.shape)
