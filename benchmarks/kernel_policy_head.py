"""The fused LM head + policy loss case of bench_kernels.py (`--cases policy_head`, `--tune`).

One GRPO micro-batch of N tokens (16 completions of N / 16 tokens, all active) through the LM head
and the dapo loss, off-policy (old log-probs 0.3 away: the clip engages) with beta = 0.04 (k3 KL);
fwd + bwd = the loss and the gradients of hidden and W. Providers:
    ours (fused)     kernels/policy_head.py with minigrpo/update_loss.py's PolicyTokenLoss: 6NDV,
                     each block's d loss / d logp from kernels/token_loss.py (one launch)
    ours (fused, autograd loss)  the same, d loss / d logp by autograd over grpo's token terms
    ours (unfused)   fused_linear_logprobs, then grpo.policy_loss: 8NDV (the general path)
    eager            (N, V) logits, log_softmax, gather, grpo.policy_loss
    torch.compile    the eager function compiled
Correctness: the unfused composition in fp64 (the chunked torch path), largest relative error over
loss, dH and dW. TFLOP/s count 6NDV for every provider. The tune mode sweeps the fused path's
token block (`rows`: scratch of rows x V logits) for time and peak memory.
"""

from __future__ import annotations

import functools

import bench_kernels as bk
import torch

from minigrpo import grpo
from minigrpo.kernels import fused_linear_logprobs, fused_linear_token_loss
from minigrpo.update_loss import policy_token_loss

ROWS = 16  # completions per micro-batch
OPTS = grpo.LossOptions(loss_type="dapo", epsilon_high=0.28, beta=0.04)


def _loss_inputs(h, w, t):
    """mask, advantages, normaliser, old and reference log-probs of one micro-batch (ROWS, N / ROWS)."""
    with torch.no_grad():
        logp = fused_linear_logprobs(h, w, t).view(ROWS, -1)  # (ROWS, Tc)
    mask = torch.ones_like(logp)
    return dict(
        mask=mask,
        advantages=torch.randn(ROWS, device=h.device),
        normalizer=grpo.make_normalizer(mask, OPTS.loss_type),
        old_logp=logp + 0.3 * torch.randn_like(logp),
        ref_logp=logp + 0.2 * torch.randn_like(logp),
    )


def _policy_loss(logp, x):
    kw = dict(normalizer=x["normalizer"], ref_logp=x["ref_logp"])
    return grpo.policy_loss(logp.view(ROWS, -1), x["old_logp"], x["advantages"], x["mask"], OPTS, **kw)[0]


def fused(h, w, t, x, rows=None, closed_form=True):
    keys = ("old_logp", "ref_logp")
    token_loss = policy_token_loss(
        x["mask"] > 0, x["mask"], x["advantages"], OPTS, x["normalizer"], **{k: x[k] for k in keys}
    )
    if not closed_form:  # the same terms, their gradient by autograd (a plain function has no value_and_grad)
        token_loss = token_loss.__call__
    return fused_linear_token_loss(h, w, t, token_loss, impl="triton", rows=rows)[0]


def unfused(h, w, t, x, impl="triton"):
    return _policy_loss(fused_linear_logprobs(h, w, t, impl=impl), x)


def eager(h, w, t, x):
    logits = h @ w.T  # (N, V) in bf16, then fp32
    return _policy_loss(torch.log_softmax(logits.float(), -1).gather(-1, t[:, None]).squeeze(-1), x)


def bench_policy_head(ceil: dict, quick: bool) -> list[dict]:
    heads = [(1536, 151936), (3072, 32064), (4096, 128256)]
    shapes = (
        [(4096, 1536, 151936), (16384, 1536, 151936)]
        if quick
        else [(m, d, v) for d, v in heads for m in (4096, 16384, 32768)]
    )
    providers = {
        "eager": eager,
        "torch.compile": bk.compiled(eager),
        "ours (unfused)": unfused,
        "ours (fused, autograd loss)": functools.partial(fused, closed_form=False),
        "ours (fused)": fused,
    }
    rows = []
    for N, D, V in shapes:
        rows += _shape(N, D, V, providers, ceil)
        torch.cuda.empty_cache()
    return rows


def _inputs(N, D, V):
    h = torch.randn(N, D, device=bk.DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device=bk.DEV) * D**-0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=bk.DEV)
    return h, w, t, _loss_inputs(h.detach(), w.detach(), t)


def _step(f, h, w, t, x):
    loss = f(h, w, t, x)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def _shape(N: int, D: int, V: int, providers: dict, ceil: dict) -> list[dict]:
    h, w, t, x = _inputs(N, D, V)
    flops = 6 * N * D * V
    ref = None
    if N == 4096 or (N, D) == (16384, 1536):  # fp64 through the chunked torch path (never (N, V))
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = _step(functools.partial(unfused, impl="ref"), h64, w64, t, x)
    out = []
    for name, f in providers.items():
        step = functools.partial(_step, f, h, w, t, x)
        check = (lambda s=step: bk.rel_err(s(), ref)) if ref is not None else None
        row = {"case": "lm_head_policy_loss_fwd_bwd", "shape": [N, D, V], "provider": name, "flops_6MHV": flops}
        out.append(bk.run_provider(row, step, check))
        bk.finish(row, ceil, flops=flops)
        torch.cuda.empty_cache()
    return out


def tune_policy_head() -> None:
    """Time and peak memory of the fused path at the issue's shape for several token blocks."""
    N, D, V = 16384, 1536, 151936
    h, w, t, x = _inputs(N, D, V)
    f = functools.partial(_step, unfused, h, w, t, x)
    print(f"tune policy_head unfused: {bk.bench_ms(f):.2f} ms, peak {bk.peak_gib(f):.3f} GiB", flush=True)
    for rows in (256, 512, 768, 1024, 1536, 2048, 4096):
        f = functools.partial(_step, functools.partial(fused, rows=rows), h, w, t, x)
        print(f"tune policy_head fused rows={rows}: {bk.bench_ms(f):.2f} ms, peak {bk.peak_gib(f):.3f} GiB", flush=True)
