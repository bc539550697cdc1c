"""SwiGLU gate  y = silu(gate) * up,  silu(g) = g * sigmoid(g).   gate, up: (..., F).

    swiglu(gate, up, *, impl="auto") -> y (..., F)
    swiglu_halves(gate_up, *, impl="auto") -> y (..., F)      gate_up = [gate | up] (..., 2F)

The MLP's activation: down(silu(gate(x)) * up(x)). Math in fp32 (fp64 for fp64), one rounding to
the input dtype. gate and up may be strided views, e.g. the two halves of a fused gate_up
projection (Phi-3): any row stride, unit stride along F. The output is a new contiguous tensor.

Why a kernel: `F.silu(gate) * up` is two launches (a decode step pays ~2-3 us for each, per layer),
and in training it saves silu(gate) besides gate and up. The fused op is one launch each way and
saves gate and up only; the backward recomputes s = sigmoid(g):
    dgate = dy * up * s * (1 + g * (1 - s)),    dup = dy * g * s
(fp32, one rounding each). The gradients come back shaped like gate and up; for the halves of a
fused gate_up, autograd's chunk backward joins them into one (..., 2F) gradient.

Triton path: one elementwise launch each way over the (M, F) rows in tiles of BLOCK_M x BLOCK_F,
for fp16, bf16 and fp32; other dtypes (fp64) take the reference.
"""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, next_power_of_2, resolve_impl, tl

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec; also the CPU fallback)
# ----------------------------------------------------------------------------------------------


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32 (fp64 for fp64), one rounding to the input dtype; differentiable.

    For fp32 inputs this is exactly `F.silu(gate) * up`.
    """
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
# ----------------------------------------------------------------------------------------------


@jit
def _swiglu_fwd_kernel(
    g_ptr,  # (M, F) gate rows, unit column stride
    u_ptr,  # (M, F) up rows, unit column stride
    y_ptr,  # (M, F) output
    M,
    F,
    stride_g_row,
    stride_u_row,
    stride_y_row,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + rows64 * stride_g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows64 * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))  # sigmoid(g); exp overflow gives s = 0, silu = -0
    y = g * s * u
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(
    dy_ptr,  # (M, F) gradient of y
    g_ptr,  # (M, F) gate rows saved by the forward
    u_ptr,  # (M, F) up rows saved by the forward
    dg_ptr,  # (M, F) output: gradient of gate
    du_ptr,  # (M, F) output: gradient of up
    M,
    F,
    stride_dy_row,
    stride_g_row,
    stride_u_row,
    stride_dg_row,
    stride_du_row,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows64 * stride_g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows64 * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))  # sigmoid(g), recomputed
    # d silu / dg = s + g * s * (1 - s) = s * (1 + g * (1 - s))
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(dg_ptr + rows64 * stride_dg_row + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows64 * stride_du_row + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(t: torch.Tensor, F: int) -> torch.Tensor:
    """View t as (M, F) rows with unit column stride, copying only if no such view exists."""
    t2 = t.reshape(-1, F)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _config(M: int, F: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_F, num_warps): tiles of up to 4K elements, 16 per thread (as rmsnorm's forward)."""
    block_f = min(1024, next_power_of_2(F))
    block_m = max(1, min(next_power_of_2(M), 4096 // block_f))
    return block_m, block_f, max(1, min(8, block_m * block_f // 512))


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (M, F) rows -> y (M, F) contiguous, in gate's dtype."""
    M, F = gate.shape
    y = torch.empty((M, F), dtype=gate.dtype, device=gate.device)
    block_m, block_f, num_warps = _config(M, F)
    _swiglu_fwd_kernel[(cdiv(M, block_m), cdiv(F, block_f))](
        gate, up, y,
        M, F,
        gate.stride(0), up.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_F=block_f, num_warps=num_warps,
    )  # fmt: skip
    return y


def _swiglu_bwd(dy, gate, up, dgate=None, dup=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, gate, up: (M, F) rows -> dgate, dup (M, F), in gate's dtype: new contiguous tensors, or
    written into the given (M, F) row views (e.g. the two halves of one (M, 2F) gradient)."""
    M, F = gate.shape
    dgate = torch.empty((M, F), dtype=gate.dtype, device=gate.device) if dgate is None else dgate
    dup = torch.empty((M, F), dtype=up.dtype, device=up.device) if dup is None else dup
    block_m, block_f, num_warps = _config(M, F)
    _swiglu_bwd_kernel[(cdiv(M, block_m), cdiv(F, block_f))](
        dy, gate, up, dgate, dup,
        M, F,
        dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        BLOCK_M=block_m, BLOCK_F=block_f, num_warps=num_warps,
    )  # fmt: skip
    return dgate, dup


# ----------------------------------------------------------------------------------------------
# 4. Autograd
# ----------------------------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    """swiglu on (M, F) rows; saves gate and up only (silu(gate) is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        dgate, dup = _swiglu_bwd(dy, gate, up)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


class SwiGLUHalvesFunction(torch.autograd.Function):
    """swiglu on the two halves of (M, 2F) rows [gate | up]; the gradient comes back as ONE (M, 2F)
    tensor, each half written in place by the kernel. (On two halves taken by split or chunk,
    autograd would join their gradients with a copy: a (M, 2F) read and write per MLP, 4% of a
    Qwen2.5-1.5B update on an H100.)"""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        F = gate_up.shape[1] // 2
        return _swiglu_fwd(gate_up[:, :F], gate_up[:, F:])

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        F = gate_up.shape[1] // 2
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        d = torch.empty_like(gate_up, memory_format=torch.contiguous_format)  # (M, 2F)
        _swiglu_bwd(dy, gate_up[:, :F], gate_up[:, F:], d[:, :F], d[:, F:])
        return d


# ----------------------------------------------------------------------------------------------
# 5. Public functions
# ----------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate, up (..., F) of one shape; returns a contiguous (..., F) tensor.

    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "ref". The Triton path
    takes fp16, bf16 and fp32 inputs of one dtype; others (fp64) run the reference.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    path = resolve_impl(impl, gate, up)
    if path == "ref" or gate.numel() == 0 or gate.dtype not in _KERNEL_DTYPES or up.dtype != gate.dtype:
        # plain torch, two ops: autograd keeps gate, up and silu(gate), which the memory pre-flight
        # counts for impl="ref" (the kernel keeps gate and up only); fp32 gives exactly swiglu_ref
        return torch.nn.functional.silu(gate) * up if gate.dtype == up.dtype else swiglu_ref(gate, up)
    F = gate.shape[-1]
    return SwiGLUFunction.apply(_rows(gate, F), _rows(up, F)).view(gate.shape)


def swiglu_halves(gate_up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2F) = [gate | up] (one GEMM's output): (..., F) contiguous.

    The same values as swiglu(*gate_up.chunk(2, -1)); on the kernel path its gradient is one
    (..., 2F) tensor made in place (SwiGLUHalvesFunction), where chunking would join two.
    """
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_halves: gate_up's last dim must be even, got {tuple(gate_up.shape)}")
    two_f = gate_up.shape[-1]
    path = resolve_impl(impl, gate_up)
    if path == "ref" or gate_up.numel() == 0 or gate_up.dtype not in _KERNEL_DTYPES:
        return swiglu(*gate_up.chunk(2, dim=-1), impl="ref")
    return SwiGLUHalvesFunction.apply(_rows(gate_up, two_f)).view(*gate_up.shape[:-1], two_f // 2)
