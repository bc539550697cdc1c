"""The clipped per-token loss and its closed-form derivative (kernels/token_loss.py) vs autograd.

The spec is grpo's own token math under autograd (policy_ratio, importance weights, token_terms,
times the token weight), in fp32 as the loop runs it. Both impls ("triton" under the CPU
interpreter, "ref" the torch closed form) must give its loss and its gradient in the log-prob to
fp32 rounding (rtol 1e-6), including the places where autograd's conventions decide: ratios on the
clip bounds and on delta (the clamp passes the gradient there), the two arms of the min equal
(each gets half), log-ratios exactly at +-LOG_RATIO_CLAMP, and A = 0.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers.kernel_checks import DEVICES, kernel_device

from minigrpo import grpo
from minigrpo.kernels import clipped_token_loss, clipped_token_loss_and_grad

C = grpo.LOG_RATIO_CLAMP
SCENARIOS = {  # name -> (LossOptions overrides, old_logp given, is_weight given, ref_logp given)
    "on_policy": ({}, False, False, False),
    "off_policy_clip": (dict(epsilon_high=0.28), True, False, False),
    "two_sided_is_kl": (dict(delta=1.6, beta=0.04), True, True, True),
    "on_policy_kl_is": (dict(beta=0.1), False, True, True),
    "bounds": (dict(epsilon=0.0, epsilon_high=0.0, delta=1.0, beta=0.5), True, False, True),
}


def _inputs(scenario, device, n=3000):
    overrides, with_old, with_is, with_ref = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(7)
    r = lambda s=1.0: (torch.randn(n, generator=g) * s).to(device)
    logp = -r().abs() * 3
    adv = r()
    adv[::7] = 0.0  # A = 0: both arms of the min are 0, a tie
    old = logp + r(0.4) if with_old else None
    if old is not None:
        old[::5] = logp[::5]  # ratio exactly 1: on the bounds of a zero-width clip range and on delta 1
        old[1] = logp[1] - C  # log-ratio exactly +C and -C (logp - old is exact in fp32 here)
        old[2] = logp[2] + C
        old[3] = logp[3] - 30.0  # beyond the clamp: no gradient through the ratio
    ref = logp + r(0.5) if with_ref else None
    if ref is not None:
        ref[4] = logp[4] + C  # ref - logp exactly C: the KL clamp's bound
        ref[5] = logp[5] + 25.0  # beyond it
    inputs = dict(
        logp=logp,
        advantages=adv,
        weight=torch.rand(n, generator=g).to(device),
        old_logp=old,
        is_weight=(torch.rand(n, generator=g) * 2).to(device) if with_is else None,
        ref_logp=ref,
    )
    return grpo.LossOptions(loss_type="dapo", **overrides), inputs


def _spec(opts, logp, advantages, weight, old_logp, is_weight, ref_logp):
    """grpo's token terms times the token weight, and their gradient in logp by autograd."""
    lp = logp.detach().clone().requires_grad_()
    ratio = grpo.policy_ratio(lp, lp.detach() if old_logp is None else old_logp)
    loss, _, _ = grpo.token_terms(ratio, advantages, opts, is_weight=is_weight, logp=lp, ref_logp=ref_logp)
    loss = loss * weight
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    return loss.detach(), grad


def _kernel_opts(opts):
    return dict(
        epsilon=opts.epsilon, epsilon_high=opts.epsilon_high, delta=opts.delta, beta=opts.beta, log_ratio_clamp=C
    )


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_loss_and_grad_equal_autograd_on_grpo_token_terms(scenario, impl, device):
    opts, inputs = _inputs(scenario, device)
    want_loss, want_grad = _spec(opts, **inputs)
    loss, grad = clipped_token_loss_and_grad(**inputs, **_kernel_opts(opts), impl=impl)
    assert loss.dtype == grad.dtype == torch.float32
    # atol: k3 = exp(x) - x - 1 cancels for small x, so one ulp of exp (the interpreter's numpy
    # against torch's) shows as ~1e-7 absolute there
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6)


def test_the_bounds_scenario_hits_every_convention():
    """The `bounds` inputs land on the rules they are meant to test, and those rules decide there."""
    opts, x = _inputs("bounds", "cpu")
    d = x["logp"] - x["old_logp"]
    assert (d[::5] == 0).all() and d[1] == C and d[2] == -C and d[3] > C
    assert (x["ref_logp"][4] - x["logp"][4]) == C and (x["ref_logp"][5] - x["logp"][5]) > C
    assert opts.epsilon == opts.epsilon_high == 0.0 and opts.delta == 1.0  # ratio 1 sits on lo, hi and delta
    _, grad = clipped_token_loss_and_grad(**x, **_kernel_opts(opts), impl="ref")
    kl_x = x["ref_logp"] - x["logp"]
    kl_grad = torch.where(kl_x <= C, opts.beta * (1 - torch.exp(kl_x.clamp(max=C))) * x["weight"], 0.0)
    pg_grad = grad - kl_grad
    on_bounds = (torch.arange(3000) % 5 == 0) & (x["advantages"] != 0)
    # ratio 1 on every bound: both arms tie and pass their gradient, so -A * w (not 0, not half of it)
    torch.testing.assert_close(pg_grad[on_bounds], -(x["advantages"] * x["weight"])[on_bounds], rtol=1e-5, atol=1e-6)
    assert pg_grad[3] == 0  # log-ratio past the clamp: none through the ratio
    no_kl = {**_kernel_opts(opts), "beta": 0.0}
    _, without_kl = clipped_token_loss_and_grad(**{**x, "ref_logp": None}, **no_kl, impl="ref")
    assert grad[5] == without_kl[5] and grad[4] != without_kl[4]  # ref - logp past C: none through the KL; on C: some


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_autograd_function_scales_the_saved_derivative(impl):
    dev = kernel_device()
    opts, inputs = _inputs("two_sided_is_kl", dev, n=300)
    _, grad = clipped_token_loss_and_grad(**inputs, **_kernel_opts(opts), impl=impl)
    lp = inputs.pop("logp").clone().requires_grad_()
    out = clipped_token_loss(lp, **inputs, **_kernel_opts(opts), impl=impl)
    upstream = torch.linspace(-2, 3, 300, device=dev)
    (got,) = torch.autograd.grad(out, lp, upstream)
    torch.testing.assert_close(got, upstream * grad, rtol=0, atol=0)


def test_beta_zero_drops_the_kl_term_even_where_it_would_be_infinite():
    opts, inputs = _inputs("on_policy_kl_is", "cpu", n=64)
    inputs["ref_logp"] = torch.full_like(inputs["logp"], float("-inf"))
    loss, grad = clipped_token_loss_and_grad(**inputs, **{**_kernel_opts(opts), "beta": 0.0}, impl="ref")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_empty():
    empty = torch.zeros(0, device=kernel_device())
    loss, grad = clipped_token_loss_and_grad(
        empty, empty, empty, epsilon=0.2, epsilon_high=0.2, log_ratio_clamp=C, impl="triton"
    )
    assert loss.shape == grad.shape == (0,)


@pytest.fixture
def gpu_min_max(monkeypatch):
    """The interpreter with the GPU's float min/max: Triton's default maxnum/minnum compile to PTX
    max.f32/min.f32, which return the non-NaN operand, where the interpreter's numpy propagates NaN.
    (tl.maximum(..., propagate_nan=ALL) goes through create_maximumf, left as it is.)"""
    import numpy as np
    from helpers.kernel_checks import need_interpreter
    from triton.runtime import interpreter

    need_interpreter()
    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_maxnumf", lambda self, x, y: self.binary_op(x, y, np.fmax))
    monkeypatch.setattr(builder, "create_minnumf", lambda self, x, y: self.binary_op(x, y, np.fmin))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on -inf - -inf
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_nan_log_ratios_give_nan_losses_as_autograd(impl, gpu_min_max):
    # a NaN policy, old or reference log-prob (or -inf - -inf) makes grpo's loss NaN; the kernel must
    # not clamp it into a finite ratio or KL term (with the GPU's min/max it gave 4.9e7 * beta * w)
    opts, inputs = _inputs("two_sided_is_kl", "cpu", n=64)
    nan = float("nan")
    inputs["logp"][10] = nan
    inputs["old_logp"][11] = nan
    inputs["ref_logp"][12] = nan
    inputs["logp"][13] = inputs["old_logp"][13] = float("-inf")
    want_loss, want_grad = _spec(opts, **inputs)
    assert want_loss[10:14].isnan().all() and want_loss[14:].isfinite().all()
    loss, grad = clipped_token_loss_and_grad(**inputs, **_kernel_opts(opts), impl=impl)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("name", ["advantages", "weight", "old_logp", "is_weight", "ref_logp"])
def test_per_token_inputs_must_match_logp(name, impl):
    # the kernel reads n values of each input: a short or 0-dim one would be read past its end (a
    # 0-dim weight of 0.5 gave losses off by 1.0 under the interpreter) instead of broadcast
    opts, inputs = _inputs("two_sided_is_kl", "cpu", n=10)
    for bad in (inputs[name][:5], inputs[name][0]):
        expected = f"{name} must be (n,) = (10,) like logp, got {tuple(bad.shape)}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            clipped_token_loss_and_grad(**{**inputs, name: bad}, **_kernel_opts(opts), impl=impl)
    with pytest.raises(ValueError, match=r"logp must be \(n,\), got \(2, 5\)"):
        clipped_token_loss_and_grad(**{**inputs, "logp": inputs["logp"].view(2, 5)}, **_kernel_opts(opts), impl=impl)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("spread", [1e-5, 1e-3, 0.05, 0.5])
def test_the_kl_term_near_the_reference_is_exact_to_fp32(spread, impl, device):
    """k3 = exp(x) - x - 1 ~ x^2 / 2 with x = ref - logp: fp32's exp rounds to 6e-8 near 1, which was all
    of k3 for |x| < 1e-4 (negative values, 100% off); loss and gradient within 1e-5 of fp64 at any x."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4096, generator=g, dtype=torch.float64) * 3
    ref = logp + torch.randn(4096, generator=g, dtype=torch.float64) * spread
    ref[0] = logp[0] + 0.0625  # the edge of the Triton kernel's series
    lp32, ref32 = logp.float(), ref.float()
    x = ref32.double() - lp32.double()  # what the kernel sees, in fp64
    beta, weight = 0.3, torch.ones(4096, device=device)
    loss, grad = clipped_token_loss_and_grad(
        lp32.to(device), torch.zeros(4096, device=device), weight, old_logp=None, is_weight=None,
        ref_logp=ref32.to(device), epsilon=0.2, epsilon_high=0.2, delta=None, beta=beta, log_ratio_clamp=C, impl=impl,
    )  # fmt: skip
    want_loss, want_grad = beta * (torch.expm1(x) - x), -beta * torch.expm1(x)
    assert (loss >= 0).all()
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-5, atol=1e-30)
