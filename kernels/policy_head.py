"""Fused LM head + per-token loss: the loss and its gradients in one pass over the logits (6NDV).

    fused_linear_token_loss(hidden (N, D), weight (V, D), targets (N,), token_loss, *,
                            temperature=1.0, return_entropy=False, impl="auto", rows=None)
        -> (loss 0-dim, logp (N,) fp32, entropy (N,) fp32 or None); logp and entropy are detached

Math, per token n: a = fp32(h_n @ W.T) / T (the logits rounded to the matmul dtype first, as torch
does), lse = logsumexp(a), logp_n = a[target_n] - lse, and the loss is sum_n token_loss(logp)_n.
`token_loss(logp, start, stop)` gets the log-probs (stop - start,) of tokens [start, stop) and
returns their losses (stop - start,); it must be ELEMENTWISE: loss_n may depend on logp_n and on
fixed per-token inputs, never on another token's log-prob. Then g_n = d loss / d logp_n is known as
soon as logp_n is (autograd on token_loss over one block of tokens: O(block) work), and
    dz_n = g_n (onehot(target_n) - softmax(a_n)) / T,   dH_n = dz_n @ W,   dW = sum_n dz_n.T h_n.
GRPO's clipped surrogate with token-level ratios, its k3 KL and token IS weights are elementwise
(minigrpo/update_loss.py builds token_loss from grpo.py), so the policy-gradient step needs no
separate backward pass over the logits. A token_loss that also has a method
`value_and_grad(logp, start, stop) -> (losses (r,), g (r,))` gives g in closed form, without
autograd (PolicyTokenLoss does, through kernels/token_loss.py: one launch a block where autograd
over its terms takes about 80).

Why a full-vocabulary block: softmax(a_n) needs the row's final lse, so no dz of a row exists
before the whole row of logits has been seen. The general kernel (logprobs.py) keeps one
(rows x cols) tile, and its backward recomputes the logits once the upstream gradient arrives:
2NDV forward + 6NDV backward = 8NDV. Here the upstream gradient is known inside the forward, so
the logits of a block of `rows` tokens are computed ONCE over the whole vocabulary into a scratch
buffer (rows, V) in the matmul dtype, and turned in place into dz:
    z    = h_b @ W.T                    cuBLAS, (rows, V) scratch          2 rows D V
    m, s, e, z[target]                  stats kernel over the full row     reads z
    log s, logp, entropy; g = d token_loss / d logp                         O(rows)
    z   <- dz (in place)                grad kernel                        reads + writes z
    dW  (+)= dz.T @ h_b                 cuBLAS, W.dtype, once per block    2 rows D V
    dH_b  = dz @ W                      cuBLAS, rounded once               2 rows D V
6NDV in all, and the (N, V) logits never exist. The backward only hands out the stored dH and dW
(scaled by the incoming gradient of the loss, a scalar; it runs once).

The price is memory: the scratch is rows x V x b bytes, against the general kernel's one tile of
about 64 MiB. Small blocks are cheap in memory but slow: each block reads W twice, reads and writes
dW once (2 D V b bytes each), so below about a thousand rows the three matmuls of a block become
bound by memory traffic, not FLOPs (Qwen2.5-1.5B's head, D=1536, V=151936: W is 0.43 GiB). The
default, `plan_rows`, gives blocks of about 160M logits on CUDA: 1024 rows x 151936 (0.29 GiB of
bf16 scratch; peak extra memory of fwd+bwd about dW + dH + scratch = 0.77 GiB for N=16384). dW is
accumulated in W.dtype, rounded once per block: 16 times at N=16384 against the general kernel's 4
(an fp32 accumulator would add V D 4 bytes, 0.87 GiB), so its bf16 rounding error is about twice
the general kernel's (u sqrt(k / 2) for k roundings). `rows=` overrides the plan
(`bench_kernels.py --tune --cases policy_head` sweeps it). Measured on an H100 (N=16384, bf16):
41.8-41.9 ms fwd+bwd at 0.77 GiB against 54-55 ms for the log-prob kernel + policy_loss and
47-48 ms for torch.compile (13.9 GiB); with the token loss's gradient by autograd, 43.6-44.7 ms.

impl="triton": the row statistics and dz run in the tile kernels of logprobs.py (one program per
row streams the whole vocabulary); impl="ref": the same blocks with that tile math in torch (fp32):
the CPU path. `linear_token_loss_ref` (the unfused composition on (N, V) fp32 logits, autograd for
the gradients) is the spec, for tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .logprobs import (
    _NEG,
    _finish_rows,
    _tile_grad_ref,
    _tile_grad_triton,
    _tile_stats_ref,
    _tile_stats_triton,
    head_path,
    linear_logprobs_ref,
)

TokenLoss = Callable[[torch.Tensor, int, int], torch.Tensor]  # (logp (r,), start, stop) -> losses (r,)
_SCRATCH_ELEMS = {"cuda": 160 * 2**20, "cpu": 4 * 2**20}  # logits of one block of tokens x V

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec): the unfused composition
# ----------------------------------------------------------------------------------------------


def linear_token_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss: TokenLoss,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp (N,), entropy (N,)): log-probs of the full logits, then the token losses summed.

    Materialises (N, V) fp32 logits; differentiable by autograd. For tests only.
    """
    logp, entropy = linear_logprobs_ref(hidden, weight, targets, temperature)  # (N,) each
    return token_loss(logp, 0, logp.shape[0]).sum(), logp, entropy


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels: logprobs.py's `_logprobs_stats_kernel` (online max / sum / entropy over a
#    row, here the whole vocabulary in one call) and `_logprobs_grad_kernel` (dz in place).
#    Everything else here is cuBLAS or O(N).
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# 3. The blocked forward that also computes the gradients
# ----------------------------------------------------------------------------------------------


def plan_rows(N: int, V: int, device: torch.device, rows: int | None = None) -> int:
    """Tokens per block: the scratch (rows, V) holds about _SCRATCH_ELEMS[device type] logits.

    A multiple of 128 where the budget allows, at most N; rows= forces it (tests, benchmarks).
    Public because the memory pre-flight (minigrpo/memory_parts.py) counts the scratch.
    """
    if rows is None:
        rows = max(1, _SCRATCH_ELEMS["cuda" if device.type == "cuda" else "cpu"] // V)
        rows = rows // 128 * 128 if rows >= 128 else rows
    return max(1, min(rows, N))


def _block_loss_and_grad(token_loss, logp, start, stop, grads):
    """(sum of the block's token losses, d loss / d logp (r,) or None): token_loss's own closed
    form when it has one (`value_and_grad`), else autograd over its call."""
    r = stop - start
    closed_form = getattr(token_loss, "value_and_grad", None)
    if grads and closed_form is not None:
        losses, g = closed_form(logp, start, stop)
        assert losses.shape == g.shape == (r,), f"value_and_grad gave {tuple(losses.shape)}, {tuple(g.shape)} for {r}"
        return losses.sum(), g
    with torch.enable_grad():  # autograd.Function.forward runs without
        lp = logp.detach().requires_grad_(grads)
        losses = token_loss(lp, start, stop)  # (r,)
        assert losses.shape == (r,), f"token_loss gave {tuple(losses.shape)} for {r} tokens"
        block = losses.sum()
        g = None
        if grads:
            g = torch.autograd.grad(block, lp)[0] if block.requires_grad else torch.zeros_like(lp)
    return block.detach(), g


def _fused_forward(h, w, tgt, token_loss, inv_t, want_entropy, need_dh, need_dw, impl, rows):
    """h (N, D), w (V, D), tgt (N,) int64 -> loss, logp (N,), entropy (N,) or None, dH or None, dW or None."""
    N, V = h.shape[0], w.shape[0]
    R = plan_rows(N, V, h.device, rows)
    acc = dict(dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)  # fp32 (fp64 for fp64)
    logp = torch.empty(N, **acc)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None  # (N, D)
    dw = (torch.empty if N else torch.zeros)(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    grads = need_dh or need_dw
    # row statistics of all N tokens, initialised once (a block works on its slice):
    m = torch.full((N,), _NEG, **acc)  # running max of the raw logits z
    s = torch.zeros(N, **acc)  # sum of exp(d), d = (z - m) / T = a - max a
    e = torch.zeros(N, **acc) if want_entropy else None  # sum of exp(d) d
    zt, log_s = torch.empty(N, **acc), torch.empty(N, **acc)  # the target's raw logit; log s
    scratch = torch.empty(R * V, dtype=h.dtype, device=h.device)  # the block's logits, then dz
    block_losses = []  # 0-dim sums, added up once at the end
    for n0 in range(0, N, R):
        n1 = min(n0 + R, N)
        b, hb, tb = slice(n0, n1), h[n0:n1], tgt[n0:n1]
        z = torch.mm(hb, w.T, out=scratch[: (n1 - n0) * V].view(n1 - n0, V))  # (r, V): each logit computed once
        e_b = e[b] if want_entropy else None
        if impl == "triton":
            _tile_stats_triton(z, tb, 0, inv_t, m[b], s[b], e_b, zt[b], V)
        else:
            _tile_stats_ref(z, tb, 0, inv_t, m[b], s[b], e_b, zt[b])
        logp[b], log_s[b] = _finish_rows(m[b], s[b], zt[b], inv_t)  # (r,) each; (zt - m) / T - log s
        block, g = _block_loss_and_grad(token_loss, logp[b], n0, n1, grads)
        block_losses.append(block)
        if not grads:
            continue
        g = g.to(acc["dtype"]).contiguous()
        if impl == "triton":
            _tile_grad_triton(z, tb, 0, inv_t, m[b], log_s[b], log_s[b], g, None)  # z <- dz / T (no entropy)
        else:
            _tile_grad_ref(z, tb, 0, inv_t, m[b], log_s[b], log_s[b], g, None)
        if dw is not None:
            torch.mm(z.T, hb, out=dw) if n0 == 0 else dw.addmm_(z.T, hb)
        if dh is not None:
            torch.mm(z, w, out=dh[n0:n1])
    total = torch.stack(block_losses).sum().to(acc["dtype"]) if block_losses else torch.zeros((), **acc)
    entropy = log_s - e / s if want_entropy else None
    return total, logp, entropy, dh, dw


# ----------------------------------------------------------------------------------------------
# 4. Autograd: the forward computes the gradients, the backward hands them out
# ----------------------------------------------------------------------------------------------


class LinearTokenLossFunction(torch.autograd.Function):
    """(h (N, D), W (V, D), targets (N,)) -> (loss 0-dim, logp (N,), entropy (N,) or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_loss, temperature, want_entropy, impl, rows, need_dh, need_dw):
        loss, logp, entropy, dh, dw = _fused_forward(
            hidden, weight, targets, token_loss, 1.0 / temperature, want_entropy, need_dh, need_dw, impl, rows
        )
        entropy = entropy if entropy is not None else logp.new_zeros(0)
        ctx.mark_non_differentiable(logp, entropy)
        ctx.set_materialize_grads(False)
        ctx.grads = (dh, dw)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_entropy):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_token_loss: its gradients were computed in the forward and handed out by "
                "the first backward; a second backward through the same loss is not supported"
            )
        dh, dw = ctx.grads
        ctx.grads = None  # the caller owns them now (autograd may keep them as .grad)
        if g_loss is None:
            return (None,) * 10
        scale = float(g_loss)  # a host read: it spares two passes over dH and dW for loss.backward()
        if scale != 1.0:
            dh = dh.mul_(scale) if dh is not None else None
            dw = dw.mul_(scale) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------


def fused_linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss: TokenLoss,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sum_n token_loss(log_softmax(hidden @ weight.T / temperature)[targets])_n, its gradients made in one pass.

    Args:
        hidden: (N, D) activations before the LM head (any float dtype; the matmuls run in it).
        weight: (V, D) LM-head weight, same dtype as hidden.
        targets: (N,) token ids in [0, V).
        token_loss: (logp (r,) fp32, start, stop) -> (r,) losses of tokens [start, stop); elementwise
            in logp (see the module docstring). Called once per block, under autograd, unless
            it has a closed-form `value_and_grad` (same arguments -> (losses, d losses / d logp)).
        temperature: logits are divided by it (sampling temperature).
        return_entropy: also return the per-token entropy (detached, for metrics).
        impl: "auto" (Triton on CUDA, the blocked torch path elsewhere), "triton" or "ref".
        rows: tokens per block (scratch of rows x V logits); None: plan_rows' choice.
    Returns:
        loss: 0-dim fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden and weight.
        logp: (N,) fp32 log-probs, detached.
        entropy: (N,) fp32, detached, or None without return_entropy.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, D), got {tuple(hidden.shape)}")
    path = head_path(hidden, weight, targets, temperature, impl)
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    tgt = targets.to(torch.int64).contiguous()
    loss, logp, entropy = LinearTokenLossFunction.apply(
        hidden, weight, tgt, token_loss, float(temperature), return_entropy, path, rows, need_dh, need_dw
    )
    return loss, logp, entropy if return_entropy else None
