"""Edge inputs of the LM-head kernels (log-probs, cross-entropy, the fused policy head) vs fp64.

Both impls: "triton" (the tile kernels, under the CPU interpreter without CUDA) and "ref" (the
chunked torch path). Cases: logits beyond the running max's old finite start value (-1e30; bf16
reaches -3.4e38), `ignore_index=None` (every target counts), and a cross-entropy whose targets are
all ignored (a finite loss, not NaN).
"""

from __future__ import annotations

import pytest
import torch
from helpers.kernel_checks import DEVICES, FLOOR, rel_err

from minigrpo.kernels import (
    fused_linear_cross_entropy,
    fused_linear_logprobs,
    fused_linear_token_loss,
    linear_cross_entropy_ref,
    linear_logprobs_ref,
)


def _far_below_logits(device):
    """hidden (5, 1) of powers of two, weight (37, 1) in -1.2e30 - [0, 3e27]: logits z = h w (exact
    products) all below -1e30, and T = 1e27, so that a = z / T spreads over O(1) within a row (a
    real spread of probabilities and entropy) while lying 600-4800 below -1e30 / T."""
    h = torch.tensor([[1.0], [2.0], [1.0], [4.0], [2.0]], device=device)
    w = (-1.2e30 - 3e27 * torch.rand(37, 1, dtype=torch.float64, device=device)).float()
    tgt = torch.tensor([0, 36, 5, 17, 29], device=device)
    return h, w, tgt, 1e27


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_logits_far_below_minus_1e30_keep_their_logp_entropy_and_grads(impl, device):
    # the running max used to start at -1e30: a row whose logits all lie below it found no max, so
    # s = 0 and logp = +inf, entropy NaN
    h, w, tgt, T = _far_below_logits(device)
    g = torch.randn(5, dtype=torch.float64, device=device)
    ge = torch.randn(5, dtype=torch.float64, device=device)

    def run(fn, hh, ww):
        hh, ww = hh.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        logp, ent = fn(hh, ww)
        ((logp.double() * g).sum() + (ent.double() * ge).sum()).backward()
        return logp.detach(), ent.detach(), hh.grad, ww.grad

    ref = run(lambda a, b: linear_logprobs_ref(a, b, tgt, T), h.double(), w.double())
    plain = run(lambda a, b: linear_logprobs_ref(a, b, tgt, T), h, w)  # fp32 torch on the full logits
    got = run(
        lambda a, b: fused_linear_logprobs(a, b, tgt, temperature=T, return_entropy=True, impl=impl, tile=(2, 16)),
        h,
        w,
    )
    _check_budget(["logp", "entropy", "dh", "dw"], got, plain, ref)
    assert float(ref[1].min()) > 0.5  # a real spread of probabilities, not a one-hot


def _check_budget(names, got, plain, ref):
    """err(kernel) <= 2 * err(fp32 torch) + FLOOR: dh = dz @ W sums terms ~ 1e3 to ~ 1, so fp32
    cancellation sets its error, for torch as for the kernel."""
    for name, a, p, r in zip(names, got, plain, ref):
        assert torch.isfinite(a).all(), f"{name}: {a}"
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[torch.float32], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_policy_head_logits_far_below_minus_1e30(impl, device):
    h, w, tgt, T = _far_below_logits(device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, logp, ent = fused_linear_token_loss(
        hh, ww, tgt, lambda lp, a, b: -lp, temperature=T, return_entropy=True, impl=impl, rows=2
    )
    loss.backward()
    got = [logp, ent, hh.grad, ww.grad]
    ref, plain = [], []
    for hb, wb, out in ((h.double(), w.double(), ref), (h, w, plain)):
        hb, wb = hb.clone().requires_grad_(), wb.clone().requires_grad_()
        lp, en = linear_logprobs_ref(hb, wb, tgt, T)
        (-lp.sum()).backward()
        out += [lp.detach(), en.detach(), hb.grad, wb.grad]
    _check_budget(["logp", "entropy", "dh", "dw"], got, plain, ref)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_ignore_index_none_counts_every_target(impl, device):
    # None (no ignored value) used to fail inside torch.where with a TypeError
    h = torch.randn(6, 16, device=device)
    w = torch.randn(101, 16, device=device)
    tgt = torch.tensor([0, 100, 3, 7, 50, 99], device=device)
    logp, ent = fused_linear_logprobs(h, w, tgt, return_entropy=True, ignore_index=None, impl=impl)
    ref_logp, ref_ent = linear_logprobs_ref(h.double(), w.double(), tgt, ignore_index=None)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    ce = fused_linear_cross_entropy(h, w, tgt, ignore_index=None, impl=impl)
    torch.testing.assert_close(ce.double(), -ref_logp.mean(), rtol=1e-5, atol=1e-5)
    if device.type == "cpu":  # (CUDA checks the range asynchronously: a device assert, not an exception)
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 101\) \(the vocabulary of weight\); got -100"):
            fused_linear_logprobs(h, w, torch.full_like(tgt, -100), ignore_index=None, impl=impl)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_cross_entropy_mean_over_no_target_is_zero_not_nan(impl, device):
    # torch's F.cross_entropy gives NaN (0 / 0) here, which poisons a sum of micro-batch losses
    h = torch.randn(4, 16, device=device, requires_grad=True)
    w = torch.randn(33, 16, device=device, requires_grad=True)
    tgt = torch.full((4,), -100, device=device)
    loss = fused_linear_cross_entropy(h, w, tgt, impl=impl)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    # with some targets left, the mean is still torch's
    tgt[1:3] = torch.tensor([5, 32])
    got = fused_linear_cross_entropy(h, w, tgt, impl=impl)
    torch.testing.assert_close(got, linear_cross_entropy_ref(h, w, tgt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_a_temperature_whose_inverse_is_no_normal_fp32_fails_clearly(impl, device):
    # the kernels scale by 1 / T: 1 / 1e50 is 0 in fp32 (every logit alike, and 0 * -inf on masked
    # columns), inf gives 0 * -inf too; the sampler and the config stop at 1e37 as well
    h = torch.randn(3, 8, device=device)
    w = torch.randn(1001, 8, device=device)
    tgt = torch.tensor([0, 1000, 17], device=device)
    logp = fused_linear_logprobs(h, w, tgt, temperature=1e37, impl=impl, tile=(2, 384))
    log_v = torch.full((3,), float(torch.tensor(1001.0, dtype=torch.float64).log()), device=device)
    torch.testing.assert_close(logp.double(), -log_v.double(), rtol=1e-5, atol=0)  # nearly uniform
    for t in (1e50, float("inf")):
        with pytest.raises(ValueError, match=r"temperature must be at most 1e\+37 \(1 / T a normal fp32\)"):
            fused_linear_logprobs(h, w, tgt, temperature=t, impl=impl)
        with pytest.raises(ValueError, match=r"temperature must be at most 1e\+37"):
            fused_linear_token_loss(h, w, tgt, lambda lp, a, b: lp, temperature=t, impl=impl)
