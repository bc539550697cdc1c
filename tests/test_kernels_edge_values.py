"""Edge values through the LM-head kernels (log-probs + entropy, cross-entropy, the fused policy head) vs fp64.

The logits are exact in every dtype (hidden and weight hold small dyadic numbers, so each dot
product is exact in fp16, bf16 and fp32 whatever the summation order), so the fp64 spec on the same
inputs is the exact answer and the kernels are held to fp32 rounding of their own math. Cases:
  masked vocabulary entries: logit -inf through a bias column (h = [x, 1], W = [w, b], b = -inf on
    the masked entries), scattered and as whole vocab chunks, including a row's first chunk;
  (z - max) / T overflowing fp32 (b = -2^127, T = 1/2: finite logits, a = -inf) and, in fp16, the
    logit itself overflowing in the matmul (b = -2^15 on two bias columns);
  huge logits (|z| ~ 2^120 in fp32 / bf16, 2^12 in fp16, T as large), tiny T = 1e-4 with tied
    maxima (entropy log 2 exactly), large T = 100;
  ignored rows, N = 1, V not a multiple of the vocab chunk (300 = 128 + 128 + 44).
Entropy is sum_v -p_v log p_v with the limit 0 at p_v = 0; its gradient too. Where a -inf weight
meets a zero gradient (dH = dz @ W at masked entries) fp64 torch gives NaN as well: those columns
of dH are left out, every other value must be finite and match.
"""

from __future__ import annotations

import pytest
import torch
from helpers.kernel_checks import DEVICES

from minigrpo.kernels import (
    fused_linear_cross_entropy,
    fused_linear_logprobs,
    fused_linear_token_loss,
    linear_logprobs_ref,
)
from minigrpo.kernels import logprobs as logprobs_module

IGNORE = -100
N, D, V = 5, 6, 300
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}
MASKED = torch.cat([torch.arange(0, 128), torch.arange(140, 300, 3)])  # a whole first chunk + scattered


@pytest.fixture
def narrow_blocks(monkeypatch):
    """Kernel blocks of 128 columns: a row's first block (and first chunk) can be all -inf."""
    monkeypatch.setattr(logprobs_module, "_STATS_BLOCK_V", 128)
    monkeypatch.setattr(logprobs_module, "_GRAD_BLOCK_V", 128)


def _dyadic(shape, gen, scale=1.0):
    """Small multiples of 1/8 (|x| <= 1), times a power-of-two scale: exact products and sums."""
    return torch.randint(-8, 9, shape, generator=gen).double() / 8 * scale


def _problem(case: str, dtype: torch.dtype, n: int = N, device="cpu"):
    """(hidden (n, D + k), weight (V, D + k), targets (n,), temperature, k) for a case; k counts the
    bias columns when they hold -inf (dH's NaN columns, as in fp64 torch), else 0."""
    gen = torch.Generator().manual_seed(11)
    x, w = _dyadic((n, D), gen), _dyadic((V, D), gen)
    tgt = torch.randint(140, V, (n,), generator=gen)
    tgt[0] = 139  # a finite entry next to the masked ones (139 is not masked)
    k, b, T = 1, 0.0, 1.0
    if case == "masked_inf":
        b = float("-inf")
    elif case == "masked_large_T":
        b, T = float("-inf"), 100.0
    elif case == "overflow":  # finite logits; a = (z - max) / T leaves fp32's range
        b, T = (-(2.0**15), 1.0) if dtype == torch.float16 else (-(2.0**127), 0.5)
        k = 2 if dtype == torch.float16 else 1  # fp16: -2^16 + x rounds to -inf in the matmul itself
    elif case == "huge":  # logits ~ 2^120 (2^12 in fp16), spread O(1) once divided by T
        T = 2.0**12 if dtype == torch.float16 else 2.0**120
        w = w * T
        b = float("-inf")
    elif case == "tiny_T":  # a tie at the max: p = 1/2 on each, entropy log 2, the rest vanishes
        b, T = float("-inf"), 1e-4
        x[:, -1] = 8.0  # the tied columns 201, 202 (unmasked) read 8; every other |x . w| <= 5
        w[:, -1] = 0.0
        w[201:203] = 0.0
        w[201:203, -1] = 1.0
        tgt[1:] = 201 + torch.arange(n - 1) % 2
    else:
        raise AssertionError(case)
    bias = torch.zeros(V, k, dtype=torch.float64)
    bias[MASKED] = b
    h = torch.cat([x, torch.ones(n, k, dtype=torch.float64)], 1)
    w = torch.cat([w, bias], 1)
    if n > 2:
        tgt[2] = IGNORE
    return h.to(dtype).to(device), w.to(dtype).to(device), tgt.to(device), T, (k if b == float("-inf") else 0)


def _run(fn, h, w, g, ge):
    """(logp, entropy, dH, dW) of fn(h, w) -> (logp, entropy) under the upstream gradients g, ge."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = fn(h, w)
    ((logp.double() * g).sum() + (ent.double() * ge).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def _check(names, got, plain, ref, dtype, k):
    """Each output finite where fp64 is, with err(kernel) <= 2 err(plain torch in dtype) + FLOOR[dtype]
    (err: relative norm against fp64; dH without its k bias columns: see the module docstring)."""
    for name, a, p, r in zip(names, got, plain, ref):
        if name == "dh" and k:
            a, p, r = a[:, :-k], p[:, :-k], r[:, :-k]
        assert torch.isfinite(r).all(), f"{name}: the fp64 spec itself is not finite"
        assert torch.isfinite(a).all(), f"{name}: {a}"
        e_k, e_p = _rel_err(a, r), _rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"


CASES = ["masked_inf", "masked_large_T", "overflow", "huge", "tiny_T"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_logprobs_entropy_and_grads_at_edge_values(case, dtype, impl, device, narrow_blocks):
    # entropy was NaN (0 * -inf in sum p a) on any row with a -inf logit or an a = (z - max) / T
    # overflowing to -inf, its gradient too; a row whose first vocab chunk was all -inf had NaN logp
    h, w, tgt, T, k = _problem(case, dtype, device=device)
    scale = min(T, 1.0)  # dz ~ g / T: kept within fp16's range at T = 1e-4
    g = torch.randn(N, dtype=torch.float64, device=device) * scale
    ge = torch.randn(N, dtype=torch.float64, device=device) * scale
    spec = lambda a, b: linear_logprobs_ref(a, b, tgt, T)
    ref, plain = _run(spec, h.double(), w.double(), g, ge), _run(spec, h, w, g, ge)
    names = ["logp", "entropy", "dh", "dw"]
    for tile in [(2, 128), None]:  # chunks of 128, 128, 44 columns; and one chunk over all of V
        fused = lambda a, b, tile=tile: fused_linear_logprobs(
            a, b, tgt, temperature=T, return_entropy=True, impl=impl, tile=tile
        )
        got = _run(fused, h, w, g, ge)
        _check(names, got, plain, ref, dtype, k)
        assert got[0][2] == 0 and got[1][2] == 0 and torch.all(got[2][2, :D] == 0)  # the ignored row
    if case == "tiny_T":
        log2 = torch.tensor(2.0, dtype=torch.float64, device=device).log()
        torch.testing.assert_close(ref[1][torch.arange(N) != 2], log2.expand(N - 1), rtol=1e-12, atol=0)
        torch.testing.assert_close(got[1][torch.arange(N) != 2].double(), log2.expand(N - 1), rtol=2e-6, atol=0)


def test_the_torch_spec_defines_p_log_p_as_zero_at_p_zero():
    # linear_logprobs_ref gave NaN entropy (and NaN gradients) for a -inf logit; in fp32 as in fp64
    h, w, tgt, T, k = _problem("masked_inf", torch.float32)
    g, ge = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    spec32 = _run(lambda a, b: linear_logprobs_ref(a, b, tgt, T), h, w, g, ge)
    spec64 = _run(lambda a, b: linear_logprobs_ref(a, b, tgt, T), h.double(), w.double(), g, ge)
    for name, a, r in zip(["logp", "entropy", "dh", "dw"], spec32, spec64):
        a, r = (a[:, :-k], r[:, :-k]) if name == "dh" else (a, r)
        assert torch.isfinite(r).all() and _rel_err(a, r) < 1e-6, name
    # the same entropy as over the unmasked entries alone
    keep = torch.ones(V, dtype=torch.bool)
    keep[MASKED] = False
    logits = (h.double() @ w.double().T)[:, keep] / T  # (N, V') finite
    p = logits.softmax(-1)
    alone = torch.where(tgt == IGNORE, 0.0, -(p * p.log()).sum(-1))
    torch.testing.assert_close(spec64[1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("n", [1, 4])
def test_one_token_and_a_masked_first_chunk(n, impl, device, narrow_blocks):
    # N = 1 and a row whose first vocab chunk (and first kernel block) holds only -inf
    h, w, tgt, T, k = _problem("masked_inf", torch.float32, n=n, device=device)
    g = torch.randn(n, dtype=torch.float64, device=device)
    ge = torch.randn(n, dtype=torch.float64, device=device)
    spec = lambda a, b: linear_logprobs_ref(a, b, tgt, T)
    ref, plain = _run(spec, h.double(), w.double(), g, ge), _run(spec, h, w, g, ge)
    fused = lambda a, b: fused_linear_logprobs(a, b, tgt, temperature=T, return_entropy=True, impl=impl, tile=(1, 128))
    _check(["logp", "entropy", "dh", "dw"], _run(fused, h, w, g, ge), plain, ref, torch.float32, k)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_with_masked_vocab_chunks(reduction, impl, device, narrow_blocks):
    # cross-entropy was NaN for every row once a vocab chunk held only -inf logits
    h, w, tgt, _, k = _problem("masked_inf", torch.float32, device=device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, tgt, reduction=reduction, impl=impl, tile=(2, 128))
    loss.sum().backward()
    out = []
    for hb, wb in ((h.double(), w.double()), (h, w)):  # fp64, and plain torch in fp32
        hb, wb = hb.clone().requires_grad_(), wb.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(hb @ wb.T, tgt, ignore_index=IGNORE, reduction=reduction)
        ref.sum().backward()
        out.append([ref.detach(), hb.grad, wb.grad])
    _check(["loss", "dh", "dw"], [loss.detach(), hh.grad, ww.grad], out[1], out[0], torch.float32, k)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_policy_head_at_edge_values(case, dtype, impl, device, narrow_blocks):
    # the fused policy head shares the stats kernel: its entropy was NaN on the same rows
    h, w, tgt, T, k = _problem(case, dtype, device=device)
    keep = tgt != IGNORE  # the policy head takes no ignore_index
    h, tgt = h[keep], tgt[keep]
    coef = torch.randn(tgt.shape[0], dtype=torch.float32, device=device) * min(T, 1.0)  # dz ~ coef / T
    token_loss = lambda lp, start, stop: -lp * coef[start:stop]
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, logp, ent = fused_linear_token_loss(
        hh, ww, tgt, token_loss, temperature=T, return_entropy=True, impl=impl, rows=2
    )
    loss.backward()
    out = []
    for hb, wb in ((h.double(), w.double()), (h, w)):  # fp64, and plain torch in dtype
        hb, wb = hb.clone().requires_grad_(), wb.clone().requires_grad_()
        lp, en = linear_logprobs_ref(hb, wb, tgt, T)
        total = (-lp * coef.to(lp.dtype)).sum()
        total.backward()
        out.append([total.detach().reshape(1), lp.detach(), en.detach(), hb.grad, wb.grad])
    got = [loss.detach().reshape(1), logp, ent, hh.grad, ww.grad]
    _check(["loss", "logp", "entropy", "dh", "dw"], got, out[1], out[0], dtype, k)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_a_temperature_below_the_samplers_floor_fails_clearly(impl):
    # 1 / T past fp32's range (T < ~2.9e-39) gave NaN log-probs and entropy without a word
    h, w, tgt, _, _ = _problem("masked_inf", torch.float32)
    for t in (1e-31, 1e-39, 1e-45):
        with pytest.raises(ValueError, match=r"temperature must be at least 1e-30 \(z / T a finite fp32\), got "):
            fused_linear_logprobs(h, w, tgt, temperature=t, impl=impl)
        with pytest.raises(ValueError, match=r"temperature must be at least 1e-30"):
            fused_linear_token_loss(h, w, tgt.clamp(min=0), lambda lp, a, b: -lp, temperature=t, impl=impl)
    logp, ent = fused_linear_logprobs(h, w, tgt, temperature=1e-30, return_entropy=True, impl=impl)  # the floor
    spec = linear_logprobs_ref(h.double(), w.double(), tgt, 1e-30)
    torch.testing.assert_close(logp.double(), spec[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(ent.double(), spec[1], rtol=0, atol=1e-6)
