"""GRPO loss pieces at the edges of their ranges: fp32 precision of the KL near the reference policy."""

from __future__ import annotations

import pytest
import torch

from minigrpo.grpo import LossOptions, kl_k3, policy_loss


@pytest.mark.parametrize("spread", [1e-5, 1e-4, 1e-3])
def test_k3_in_fp32_is_accurate_and_nonnegative_near_the_reference(spread):
    """A policy a few steps from its reference has |ref - logp| ~ 1e-4, where k3 ~ d^2 / 2 ~ 5e-9: fp32
    exp(d) - d - 1 rounded exp(d) to 6e-8 first (median relative error 100%, 0.4% of tokens negative,
    the mean KL -1e-10 against 5e-9). Each token's k3 must be within 1e-5 of the fp64 value and >= 0."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(20000, generator=g) * 5  # fp32
    ref = logp + spread * torch.randn(20000, generator=g)
    k3 = kl_k3(logp, ref)
    d = ref.double() - logp.double()  # the fp32 difference is exact (Sterbenz)
    want = torch.expm1(d) - d
    assert k3.dtype == torch.float32
    assert (k3 >= 0).all()
    rel = (k3.double() - want).abs() / want.clamp(min=1e-300)
    assert rel.max() <= 1e-5, f"largest relative error {rel.max():.2e}"

    mask = torch.ones(4, 5000)
    opts = LossOptions(beta=0.1, max_completion_length=5000)
    _, stats = policy_loss(logp.view(4, 5000), None, torch.zeros(4), mask, opts, ref_logp=ref.view(4, 5000))
    assert abs(stats["kl"].item() - want.mean().item()) <= 1e-5 * want.mean().item()
