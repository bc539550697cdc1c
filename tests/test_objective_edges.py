"""Loss settings at the edges of their range: values without a meaning are refused by name, and the
fused per-token terms equal TRL's formula where clip and IS bounds collapse onto 1."""

from __future__ import annotations

import math

import pytest
import torch
from test_grpo_losses import trl_loss

from minigrpo.grpo import LossOptions, make_normalizer, policy_loss
from minigrpo.update_loss import policy_token_loss


def test_an_infinite_beta_is_refused_instead_of_a_nan_loss():
    # accepted before: inf * (k3 = 0 on tokens where the policy equals the reference) made the loss NaN
    with pytest.raises(ValueError, match=r"^beta must be >= 0 and finite, got inf$"):
        LossOptions(beta=math.inf)
    opts = LossOptions(beta=1e30)  # large but finite: a finite loss
    loss, _ = policy_loss(torch.zeros(2, 3), None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), opts,
                          ref_logp=torch.zeros(2, 3))  # fmt: skip
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epsilon", None, "epsilon must be a number, got None"),
        ("epsilon", "0.2", "epsilon must be a number, got '0.2'"),
        ("beta", True, "beta must be a number, got True"),
        ("is_cap", "3", "is_cap must be a number, got '3'"),
        ("delta", "2", "delta must be a number or None, got '2'"),
        ("max_completion_length", 2.5, "max_completion_length must be a whole number >= 1 or None, got 2.5"),
        ("max_completion_length", math.inf, "max_completion_length must be a whole number >= 1 or None, got inf"),
    ],
)
def test_a_setting_that_is_not_a_number_is_one_error_naming_it(field, value, message):
    # were a TypeError from a comparison ('>=' not supported ...), an OverflowError in the normaliser,
    # or a fractional dr_grpo constant accepted
    with pytest.raises(ValueError, match=f"^{message}$"):
        LossOptions(**{field: value})


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    opts = LossOptions(epsilon=np.float64(0.1), beta=np.float32(0.5), max_completion_length=np.int64(7))
    assert opts.epsilon_high == 0.1 and opts.max_completion_length == 7


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_fused_terms_equal_the_formula_where_bounds_collapse_onto_one(loss_type):
    """epsilon_high 0 < epsilon, a delta cap, IS weights truncated to exactly 1 (is_min = is_cap = 1)
    and k3: the per-token terms of the fused LM head (value and closed-form derivative) equal TRL's
    formula under autograd in fp64, within fp32 rounding."""
    g = torch.Generator().manual_seed(5)
    N, Tc = 5, 4
    mask = torch.arange(Tc)[None] < torch.tensor([4, 1, 0, 3, 2])[:, None]
    old = -torch.rand(N, Tc, generator=g, dtype=torch.float64) * 2
    logp0 = old + 0.3 * torch.randn(N, Tc, generator=g, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(N, Tc, generator=g, dtype=torch.float64)
    sampler = old + 0.2 * torch.randn(N, Tc, generator=g, dtype=torch.float64)
    A = torch.randn(N, generator=g, dtype=torch.float64)
    opts = LossOptions(loss_type, 0.2, 0.0, 1.1, 0.05, "token", "token_truncate", is_cap=1.0, is_min=1.0,
                       max_completion_length=6)  # fmt: skip
    want_logp = logp0.clone().requires_grad_()
    want = trl_loss(want_logp, old, A, mask, opts, ref, sampler, 6)
    want.backward()
    normalizer = make_normalizer(mask, loss_type, max_completion_length=6)
    terms = policy_token_loss(mask, mask.float(), A.float(), opts, normalizer,
                              old_logp=old.float(), ref_logp=ref.float(), sampler_logp=sampler.float())  # fmt: skip
    value, grad = terms.value_and_grad(logp0.float()[mask], 0, int(mask.sum()))
    assert abs(value.double().sum().item() - want.item()) < 1e-6
    torch.testing.assert_close(grad.double(), want_logp.grad[mask], rtol=1e-5, atol=1e-7)
