"""GRPO's clipped per-token loss and its derivative in the log-prob, in one elementwise pass.

    clipped_token_loss_and_grad(logp (n,), advantages (n,), weight (n,), *, epsilon, epsilon_high,
                                delta=None, old_logp=None, is_weight=None, ref_logp=None, beta=0.0,
                                log_ratio_clamp, impl="auto") -> (loss (n,), dloss/dlogp (n,))
    clipped_token_loss(...same...) -> loss (n,), differentiable in logp

Per token (all fp32), with d = logp - old (0 when old_logp is None: on-policy, ratio 1) and
C = log_ratio_clamp:
    rho   = exp(clamp(d, -C, C))
    pg    = -min(min(rho, delta) A, clamp(rho, 1 - epsilon, 1 + epsilon_high) A) * is_weight
    kl    = exp(x) - x - 1,  x = min(ref - logp, C)                      (k3; only with ref_logp)
    loss  = (pg + beta kl) * weight
The derivative follows torch's autograd conventions exactly, so that it is the gradient autograd
gives for grpo.token_terms: a clamp passes the gradient on its bounds (inclusive), and where the
two arms of the min are equal each gets half of it. So, per token,
    d pg / d logp = -is_weight * A * rho * [|d| <= C] * (w_cap [rho <= delta] + w_clip [lo <= rho <= hi])
    d kl / d logp = -(exp(x) - 1) * [ref - logp <= C]
with (w_cap, w_clip) = (1, 0) where the capped arm is the smaller, (0, 1) where the clipped one
is, (1/2, 1/2) on a tie. A NaN log-ratio or KL log-ratio gives a NaN loss, as under torch (the
kernel's min/max propagate NaN: compiled, Triton's default would return the other operand).

Why a kernel: the fused LM head (policy_head.py) needs d loss / d logp of each block of tokens
before it can turn the block's logits into their gradient. Autograd over grpo.token_terms gets it
in about 80 small launches a block (forward, then backward); this is one launch that writes the
loss and the derivative together. The spec stays grpo.token_terms (tests hold both impls to
autograd on it, bounds and ties included).
"""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, resolve_impl, tl

# ----------------------------------------------------------------------------------------------
# 1. Reference: the closed form in torch (the CPU path)
# ----------------------------------------------------------------------------------------------


def clipped_token_loss_and_grad_ref(
    logp, advantages, weight, *, epsilon, epsilon_high, delta, old_logp, is_weight, ref_logp, beta, log_ratio_clamp
):
    """(loss (n,), dloss/dlogp (n,)) in fp32 by the formulas of the module docstring; no autograd."""
    f32 = lambda t: None if t is None else t.detach().to(torch.float32)
    lp, A, wt = f32(logp), f32(advantages), f32(weight)
    C = log_ratio_clamp
    d = lp - f32(old_logp) if old_logp is not None else torch.zeros_like(lp)
    rho = torch.exp(d.clamp(-C, C))
    drho = torch.where((d >= -C) & (d <= C), rho, 0.0)  # d rho / d logp
    lo, hi = 1.0 - epsilon, 1.0 + epsilon_high
    capped = rho if delta is None else rho.clamp(max=delta)
    capped_slope = torch.ones_like(rho) if delta is None else (rho <= delta).float()
    capped_arm, clipped_arm = capped * A, rho.clamp(lo, hi) * A
    w_cap = torch.where(capped_arm < clipped_arm, 1.0, torch.where(capped_arm == clipped_arm, 0.5, 0.0))
    pg = -torch.minimum(capped_arm, clipped_arm)
    dpg = -A * drho * (w_cap * capped_slope + (1.0 - w_cap) * ((rho >= lo) & (rho <= hi)).float())
    if is_weight is not None:
        pg, dpg = pg * f32(is_weight), dpg * f32(is_weight)
    if ref_logp is not None:
        x = f32(ref_logp) - lp
        xd = x.clamp(max=C).double()  # k3 ~ x^2 / 2 is below fp32's rounding of exp(x) near 1 for |x| < 1e-3
        em1 = torch.expm1(xd)
        pg = pg + beta * (em1 - xd).float()
        dpg = dpg + beta * torch.where(x <= C, -em1.float(), 0.0)
    return pg * wt, dpg * wt


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel: one program per BLOCK tokens
# ----------------------------------------------------------------------------------------------

_BLOCK = 1024


@jit
def _clipped_token_loss_kernel(
    logp_ptr,  # (n,) fp32
    adv_ptr,  # (n,) fp32
    weight_ptr,  # (n,) fp32
    old_ptr,  # (n,) fp32, read when HAS_OLD
    isw_ptr,  # (n,) fp32, read when HAS_ISW
    ref_ptr,  # (n,) fp32, read when HAS_REF
    loss_ptr,  # (n,) fp32 output
    grad_ptr,  # (n,) fp32 output
    n,
    lo,
    hi,
    delta,
    beta,
    C,
    HAS_OLD: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    live = offs < n
    lp = tl.load(logp_ptr + offs, mask=live, other=0.0)
    A = tl.load(adv_ptr + offs, mask=live, other=0.0)
    if HAS_OLD:
        d = lp - tl.load(old_ptr + offs, mask=live, other=0.0)
    else:
        d = tl.zeros_like(lp)
    # min/max propagate NaN as torch's clamp and minimum do: the compiled default (maxnum) would turn a
    # NaN log-prob into a finite loss on the GPU (the interpreter's numpy propagates it either way).
    # The enum is spelled out in each call: assigned to a local, the compiler would make it a tensor.
    d_lo = tl.maximum(d, -C, propagate_nan=tl.PropagateNan.ALL)
    rho = tl.exp(tl.minimum(d_lo, C, propagate_nan=tl.PropagateNan.ALL))
    drho = tl.where((d >= -C) & (d <= C), rho, 0.0)
    if HAS_DELTA:
        capped = tl.minimum(rho, delta, propagate_nan=tl.PropagateNan.ALL)
        capped_slope = tl.where(rho <= delta, 1.0, 0.0)
    else:
        capped = rho
        capped_slope = tl.full(rho.shape, 1.0, tl.float32)
    capped_arm = capped * A
    rho_lo = tl.maximum(rho, lo, propagate_nan=tl.PropagateNan.ALL)
    clipped_arm = tl.minimum(rho_lo, hi, propagate_nan=tl.PropagateNan.ALL) * A
    w_cap = tl.where(capped_arm < clipped_arm, 1.0, tl.where(capped_arm == clipped_arm, 0.5, 0.0))
    clip_slope = tl.where((rho >= lo) & (rho <= hi), 1.0, 0.0)
    loss = -tl.minimum(capped_arm, clipped_arm, propagate_nan=tl.PropagateNan.ALL)
    grad = -A * drho * (w_cap * capped_slope + (1.0 - w_cap) * clip_slope)
    if HAS_ISW:
        isw = tl.load(isw_ptr + offs, mask=live, other=0.0)
        loss = loss * isw
        grad = grad * isw
    if HAS_REF:
        x = tl.load(ref_ptr + offs, mask=live, other=0.0) - lp
        xc = tl.minimum(x, C, propagate_nan=tl.PropagateNan.ALL)
        # near 0, Taylor series: fp32 rounds exp(x) to 6e-8, all of k3 ~ x^2 / 2 for |x| < 1e-4
        # (the terms left out are below 4e-7 of k3 at |x| = 1/4; beyond it fp32's exp is within 2e-6)
        e = tl.exp(xc)
        tail = 1.0 / 6.0 + xc * (1.0 / 24.0 + xc * (1.0 / 120.0 + xc * (1.0 / 720.0)))  # (e^x - 1 - x - x^2/2) / x^3
        near = tl.abs(xc) < 0.25
        k3 = tl.where(near, xc * xc * (0.5 + xc * tail), e - xc - 1.0)
        em1 = tl.where(near, xc + xc * xc * (0.5 + xc * tail), e - 1.0)  # e^x - 1
        loss = loss + beta * k3
        grad = grad + beta * tl.where(x <= C, -em1, 0.0)
    wt = tl.load(weight_ptr + offs, mask=live, other=0.0)
    tl.store(loss_ptr + offs, loss * wt, mask=live)
    tl.store(grad_ptr + offs, grad * wt, mask=live)


def _clipped_token_loss_triton(logp, advantages, weight, *, epsilon, epsilon_high, delta, old_logp, is_weight,
                               ref_logp, beta, log_ratio_clamp):  # fmt: skip
    f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()
    lp = f32(logp)
    n = lp.shape[0]
    loss, grad = torch.empty_like(lp), torch.empty_like(lp)
    if n:
        old, isw, ref = f32(old_logp), f32(is_weight), f32(ref_logp)
        _clipped_token_loss_kernel[(cdiv(n, _BLOCK),)](
            lp, f32(advantages), f32(weight), old if old is not None else lp, isw if isw is not None else lp,
            ref if ref is not None else lp, loss, grad, n, 1.0 - epsilon, 1.0 + epsilon_high,
            1.0 if delta is None else float(delta), float(beta), float(log_ratio_clamp),
            HAS_OLD=old is not None, HAS_DELTA=delta is not None, HAS_ISW=isw is not None,
            HAS_REF=ref is not None, BLOCK=_BLOCK,
        )  # fmt: skip
    return loss, grad


# ----------------------------------------------------------------------------------------------
# 3. Autograd: the forward already has the derivative, the backward scales it
# ----------------------------------------------------------------------------------------------


class ClippedTokenLossFunction(torch.autograd.Function):
    """logp (n,) -> loss (n,); the derivative is made with the loss and saved for the backward."""

    @staticmethod
    def forward(ctx, logp, run):
        loss, grad = run(logp)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        (grad,) = ctx.saved_tensors
        return g_loss * grad, None


# ----------------------------------------------------------------------------------------------
# 4. Public functions
# ----------------------------------------------------------------------------------------------


def _check_per_token(logp: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    """Refuse inputs that are not one value per token of logp (n,): the kernel reads n of each, so
    a shorter or broadcast tensor would be read past its end rather than broadcast."""
    if logp.dim() != 1:
        raise ValueError(f"logp must be (n,), got {tuple(logp.shape)}")
    for name, t in per_token.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must be (n,) = {tuple(logp.shape)} like logp, got {tuple(t.shape)}")


def clipped_token_loss_and_grad(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    weight: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: float,
    log_ratio_clamp: float,
    delta: float | None = None,
    old_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (n,), d loss / d logp (n,)), fp32, no autograd: the weighted clipped loss per token.

    Args:
        logp: (n,) the policy's log-probs of the tokens.
        advantages, weight: (n,) each token's advantage and its share of the normalised loss.
        epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] of the ratio.
        log_ratio_clamp: log-ratios are clamped to +-this before exp (grpo.LOG_RATIO_CLAMP).
        delta: two-sided clipping: the ratio's arm is capped at delta; None: no cap.
        old_logp: (n,) the log-probs the ratio is taken against; None: on-policy (ratio 1).
        is_weight: (n,) importance weights, fixed (no gradient); None: 1.
        ref_logp, beta: (n,) reference log-probs for the k3 KL term and its coefficient (beta != 0
            needs ref_logp; at beta 0 ref_logp is not read).
        impl: "auto" (Triton on CUDA, else the torch closed form), "triton" or "ref".
    """
    per_token = dict(advantages=advantages, weight=weight, old_logp=old_logp, is_weight=is_weight, ref_logp=ref_logp)
    _check_per_token(logp, **per_token)
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the KL term's reference log-probs)")
    ref_logp = ref_logp if beta != 0.0 else None  # no KL term (nor its inf * 0) at beta 0
    opts = dict(
        epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, old_logp=old_logp, is_weight=is_weight,
        ref_logp=ref_logp, beta=beta, log_ratio_clamp=log_ratio_clamp,
    )  # fmt: skip
    given = [t for t in (logp, advantages, weight, old_logp, is_weight, ref_logp) if t is not None]
    run = _clipped_token_loss_triton if resolve_impl(impl, *given) == "triton" else clipped_token_loss_and_grad_ref
    return run(logp, advantages, weight, **opts)


def clipped_token_loss(logp: torch.Tensor, advantages: torch.Tensor, weight: torch.Tensor, **opts) -> torch.Tensor:
    """The loss of clipped_token_loss_and_grad (same arguments), differentiable in logp (only)."""
    run = lambda lp: clipped_token_loss_and_grad(lp, advantages, weight, **opts)
    return ClippedTokenLossFunction.apply(logp, run)
