"""A decode step's linear layer: y = x @ W^T (+ b) for few rows x and a wide weight W, split over K.

    skinny_linear(x (..., K), weight (N, K), bias (N,) or None, *, impl="auto") -> y (..., N)

In a decode step every linear layer multiplies the M decoding rows (M = 8 .. 64 in GRPO rollouts)
by its weight, so its time is the time to read W once: 2 N K bytes against 2 M N K FLOPs, far below
what an H100 computes in that time. Reading W at the memory bandwidth needs every SM streaming its
own part of W, and a library GEMM tuned for large M tiles N only (N / 128 output tiles): 12 tiles
for a 1536-wide output on 132 SMs (see benchmarks/results/profile_decode_*.json: 55% of the
bandwidth for the decode matmuls of Qwen2.5-1.5B at M = 64).

Here the grid is (N / BLOCK_N) x SPLIT_K: program (n, s) computes the [M, BLOCK_N] tile over its
slice of K (K / SPLIT_K columns, tiles of BLOCK_K), with SPLIT_K chosen so that about
_TARGET_PROGRAMS programs stream W. Partial sums go to an fp32 workspace (SPLIT_K, M, N) and a
second kernel adds them in split order, adds the bias and rounds once to x.dtype: deterministic
(no atomics), so a sampled token never depends on scheduling. With one split the first kernel
writes the output itself.

Numerics: fp32 accumulation of bf16/fp16 products on tensor cores (tl.dot), fp32 inputs in full
fp32 (not tf32), one rounding at the end, as F.linear does up to the order of the sums. Under the
CPU interpreter the dots run on fp32 copies (its bf16 dots are wrong; bf16 products are exact in
fp32). Inference only: with grad enabled and an input that requires it, F.linear runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import cdiv, interpreting, jit, next_power_of_2, resolve_impl, tl

MAX_ROWS = 64  # the kernel's row tile: more rows take F.linear (compute starts to matter there)
_BLOCK_N = 64  # output columns per program
_BLOCK_K = 128  # reduction tile
_TARGET_PROGRAMS = 2 * 132  # two programs on each of an H100's 132 SMs, streaming W at once
# loads in flight per program: 3 x (x and W tiles, 32 KiB in bf16) = 96 KiB of shared memory, so two
# programs fit an SM (sm_90: 227 KiB); 4 stages would leave one, and a grid of 144 programs would
# then run in two waves, the second almost empty
_NUM_STAGES = 3

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec; also the CPU fallback)
# ----------------------------------------------------------------------------------------------


def skinny_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + b in fp32 (fp64 for fp64), one rounding to x.dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
# ----------------------------------------------------------------------------------------------


@jit
def _skinny_partial_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K)
    b_ptr,  # (N,): read only if DIRECT and HAS_BIAS
    out_ptr,  # (M, N): written only if DIRECT
    ws_ptr,  # (SPLIT_K, M, N) fp32 partial sums (unless DIRECT)
    M,
    N,
    K,
    stride_x_m,
    stride_x_k,
    stride_w_n,
    stride_w_k,
    stride_o_m,
    stride_o_n,
    K_SPLIT: tl.constexpr,  # columns of K per split (a multiple of BLOCK_K; a constant: loop bound)
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: add the bias and write the output here
    DOT_F32: tl.constexpr,  # dots in full fp32: fp32 inputs, or the interpreter
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        k = k_lo + k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_ok = k < k_hi
        x = tl.load(
            x_ptr + m[:, None] * stride_x_m + k[None, :] * stride_x_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )  # (BLOCK_M, BLOCK_K)
        w = tl.load(
            w_ptr + n[:, None].to(tl.int64) * stride_w_n + k[None, :] * stride_w_k,
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_K)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    mask = m_ok[:, None] & n_ok[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_off = m[:, None] * stride_o_m + n[None, :] * stride_o_n
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws_off = (s * M + m[:, None]).to(tl.int64) * N + n[None, :]
        tl.store(ws_ptr + ws_off, acc, mask=mask)


@jit
def _skinny_reduce_kernel(
    ws_ptr,  # (SPLIT_K, M, N) fp32
    b_ptr,  # (N,)
    out_ptr,  # (M, N)
    M,
    N,
    stride_o_m,
    stride_o_n,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):  # in split order: the same sum every time
        total += tl.load(ws_ptr + (s * M + row).to(tl.int64) * N + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o_m + n * stride_o_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------


def split_k(N: int, K: int, block_n: int = _BLOCK_N, block_k: int = _BLOCK_K) -> int:
    """Columns of K per split (a multiple of block_k): enough splits for ~_TARGET_PROGRAMS programs,
    at most one per K tile. Python ints only, so a CUDA graph captures a fixed launch."""
    tiles_k = cdiv(K, block_k)
    splits = max(1, min(cdiv(_TARGET_PROGRAMS, cdiv(N, block_n)), tiles_k))
    return cdiv(tiles_k, splits) * block_k


def _skinny_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    k_split: int | None = None,
    block_n: int = _BLOCK_N,
    block_k: int = _BLOCK_K,
    num_stages: int = _NUM_STAGES,
) -> torch.Tensor:
    """x (M, K) -> (M, N); k_split / block_n / block_k / num_stages: overrides of the launch (tests,
    tuning)."""
    M, K = x.shape
    N = weight.shape[0]
    k_split = split_k(N, K, block_n, block_k) if k_split is None else k_split
    assert k_split % block_k == 0, f"k_split {k_split} is not a multiple of block_k {block_k}"
    splits = cdiv(K, k_split)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    direct = splits == 1
    ws = out if direct else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    b = weight if bias is None else bias  # a placeholder pointer without a bias: never read
    _skinny_partial_kernel[(cdiv(N, block_n), splits)](
        x, weight, b, out, ws, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        K_SPLIT=k_split, HAS_BIAS=bias is not None, DIRECT=direct, DOT_F32=x.dtype == torch.float32 or interpreting(),
        BLOCK_M=max(16, next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=num_stages,
    )  # fmt: skip
    if not direct:
        block = min(1024, next_power_of_2(N))
        _skinny_reduce_kernel[(M, cdiv(N, block))](
            ws, b, out, M, N, out.stride(0), out.stride(1), SPLIT_K=splits, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=4,
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------------------------


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N) in x.dtype, for at most MAX_ROWS rows
    of x (more take F.linear). impl: "auto" (Triton on CUDA, F.linear elsewhere), "triton" or "ref"
    (skinny_linear_ref). Inference only (see the module docstring)."""
    K = x.shape[-1]
    N = weight.shape[0]
    assert weight.shape == (N, K) and (bias is None or bias.shape == (N,)), (
        f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}"
    )
    rows = x.reshape(-1, K)  # (M, K): a view for the usual (B, 1, K) decode input
    path = resolve_impl(impl, x, weight, *([] if bias is None else [bias]))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if path == "ref":
        return skinny_linear_ref(x, weight, bias)
    if needs_grad or rows.shape[0] > MAX_ROWS or rows.shape[0] == 0:
        return F.linear(x, weight, bias)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"no Triton path for {x.dtype}"
    assert weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype), (
        f"x {x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}"
    )
    return _skinny_linear_triton(rows, weight, bias).view(*x.shape[:-1], N)
