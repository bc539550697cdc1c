"""Every loss variant against TRL's published formulas in fp64, and the inputs that used to break them.

The reference below is written from the formulas (docs of TRL's GRPOTrainer, _compute_loss): per-token
ratio, clip [1 - epsilon_low, 1 + epsilon_high], two-sided delta cap, sampler IS weights (token or
sequence, truncated or masked) applied before the k3 KL, and the four aggregations.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from minigrpo.advantages import group_advantages, group_reward_stats, zero_spread_groups
from minigrpo.grpo import LossOptions, importance_weights, make_normalizer, policy_loss
from minigrpo.update_loss import policy_token_loss

INF, NAN = math.inf, math.nan


def trl_loss(logp, old, A, m, o: LossOptions, ref, sampler, max_len):
    """TRL's loss of one batch, fp64, straight from the formulas."""
    m = m.double()
    log_w = (logp - old) * m  # (N, Tc)
    if o.importance_sampling_level == "sequence":
        log_w = (log_w.sum(-1) / m.sum(-1).clamp(min=1))[:, None]  # (N, 1) GSPO
    rho = torch.exp(log_w)
    capped = rho if o.delta is None else rho.clamp(max=o.delta)
    clipped = rho.clamp(1 - o.epsilon, 1 + o.epsilon_high)
    loss = -torch.minimum(capped * A[:, None], clipped * A[:, None])
    if o.is_correction is not None:
        d = (old - sampler) * m
        if o.is_correction.startswith("sequence"):
            d = d.sum(-1, keepdim=True)
        w = torch.exp(d)
        if o.is_correction.endswith("truncate"):
            w = w.clamp(min=o.is_min, max=o.is_cap)
        else:
            w = w * (w <= o.is_cap) * (w >= (o.is_min or 0.0))
        loss = loss * w
    if o.beta:
        x = ref - logp
        loss = loss + o.beta * (torch.exp(x) - x - 1)
    loss = loss.expand_as(m) * m
    if o.loss_type == "grpo":
        return (loss.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if o.loss_type == "dr_grpo":
        return loss.sum() / (m.shape[0] * max_len)
    return loss.sum() / m.sum().clamp(min=1)  # bnpo (one micro-batch) and dapo


def _batch64():
    g = torch.Generator().manual_seed(3)
    N, Tc = 6, 5
    mask = torch.arange(Tc)[None] < torch.tensor([5, 1, 3, 0, 4, 2])[:, None]  # an empty row too
    old = -torch.rand(N, Tc, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(N, Tc, generator=g, dtype=torch.float64)  # clipping engages
    ref = logp + 0.3 * torch.randn(N, Tc, generator=g, dtype=torch.float64)
    sampler = old + 0.5 * torch.randn(N, Tc, generator=g, dtype=torch.float64)
    A = torch.randn(N, generator=g, dtype=torch.float64)
    return logp, old, ref, sampler, A, mask


VARIANTS = list(
    itertools.product(
        ["grpo", "bnpo", "dr_grpo", "dapo"],
        ["token", "sequence"],
        [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"],
        [(0.0, None), (0.1, 1.5)],  # (beta, delta)
    )
)


@pytest.mark.parametrize("loss_type,level,is_correction,beta_delta", VARIANTS)
def test_every_variant_equals_the_trl_formula_in_fp64(loss_type, level, is_correction, beta_delta):
    """fp64 inputs stay fp64: loss and gradient equal the formula to 1e-12 (fp32 rounding gave ~1e-7)."""
    beta, delta = beta_delta
    logp0, old, ref, sampler, A, mask = _batch64()
    is_bounds = dict(is_cap=1.5, is_min=0.5) if is_correction else {}
    opts = LossOptions(loss_type, 0.2, 0.28, delta, beta, level, is_correction, **is_bounds, max_completion_length=7)
    logp = logp0.clone().requires_grad_()
    loss, _ = policy_loss(logp, old, A, mask, opts, ref_logp=ref, sampler_logp=sampler)
    loss.backward()
    want_logp = logp0.clone().requires_grad_()
    want = trl_loss(want_logp, old, A, mask, opts, ref, sampler, 7)
    want.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want.item()) <= 1e-12, (loss.item(), want.item())
    assert (logp.grad - want_logp.grad).abs().max() <= 1e-12


def test_fp64_advantages_are_returned_in_fp64():
    rewards = torch.tensor([0.1, 0.7, 0.3, 2.0, -1.0, 0.5], dtype=torch.float64)
    r = rewards.view(2, 3)
    want = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    A = group_advantages(rewards, 3)
    assert A.dtype == torch.float64
    assert (A - want).abs().max() <= 1e-14
    assert group_advantages(rewards.float(), 3).dtype == torch.float32


# ----------------------------------------------------------------------------- epsilon_high and option limits


def test_epsilon_high_defaults_to_epsilon_as_in_the_config():
    """LossOptions(epsilon=0.3) clips at [0.7, 1.3] (it clipped at 1.2, the default epsilon_high)."""
    assert LossOptions(epsilon=0.3).epsilon_high == 0.3
    assert LossOptions(epsilon=0.3, epsilon_high=0.4).epsilon_high == 0.4
    logp = torch.zeros(1, 1, requires_grad=True)
    old = torch.full((1, 1), -math.log(1.25))  # ratio 1.25: inside [0.7, 1.3]
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), LossOptions(epsilon=0.3))
    loss.backward()
    assert abs(loss.item() + 1.25) < 1e-6  # -rho * A, unclipped
    assert abs(logp.grad.item() + 1.25) < 1e-6  # the gradient flows (0 if clipped)
    assert stats["clip_high_frac"].item() == 0.0


@pytest.mark.parametrize(
    "field,value",
    [("epsilon", NAN), ("epsilon", -0.1), ("epsilon_high", -0.2), ("beta", -0.01), ("beta", NAN),
     ("delta", 0.0), ("is_cap", 0.0), ("is_min", 4.0), ("is_min", -1.0), ("max_completion_length", 0)],
)  # fmt: skip
def test_loss_options_reject_numbers_without_a_meaning(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be .*got {value!r}"):
        LossOptions(**{field: value})


# ----------------------------------------------------------------------------- non-finite inputs


def test_infinite_rewards_are_masked_like_unscored_ones():
    """+-inf turned its group's advantages (all of them with "batch") into NaN."""
    rewards = torch.tensor([INF, 0.0, 1.0, 1.0, -INF, 3.0, 2.0, 2.0, 2.0])
    A = group_advantages(rewards, 3)
    s = math.sqrt(0.5) + 1e-4  # valid [0, 1] and [1, 3]: std sqrt(0.5) and sqrt(2)
    want = [0.0, -0.5 / s, 0.5 / s, -1.0 / (math.sqrt(2) + 1e-4), 0.0, 1.0 / (math.sqrt(2) + 1e-4), 0.0, 0.0, 0.0]
    assert torch.allclose(A, torch.tensor(want), atol=1e-6), A
    batch = group_advantages(rewards, 3, scale="batch")  # std of the 7 finite rewards
    finite = torch.tensor([0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0])
    assert torch.allclose(batch[[1, 2]], torch.tensor([-0.5, 0.5]) / (finite.std() + 1e-4), atol=1e-6)
    assert batch.isfinite().all() and batch[[0, 4]].eq(0).all()
    assert zero_spread_groups(torch.tensor([INF, 1.0, 1.0]), 3).tolist() == [True]
    stats = group_reward_stats(rewards, 3)
    assert abs(stats["frac_invalid_rows"].item() - 2 / 9) < 1e-6
    assert abs(stats["reward_max"].item() - 3.0) < 1e-6


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_nan_sampler_logprob_drops_its_token_instead_of_a_nan_loss(mode):
    """A NaN sampler log-prob made a NaN loss (and NaN gradients for every weight): its IS weight is 0."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]], requires_grad=True)
    sampler = logp.detach().clone()
    sampler[0, 1] = NAN
    mask, A = torch.ones(2, 3), torch.tensor([1.0, -2.0])
    opts = LossOptions(is_correction=mode)
    w, raw = importance_weights(logp.detach(), sampler, mask, mode)
    zero = w[0, 1] if mode.startswith("token") else w[0, 0]  # the token, or its whole row
    assert zero.item() == 0.0 and raw.isnan().any()
    loss, stats = policy_loss(logp, None, A, mask, opts, sampler_logp=sampler)
    loss.backward()
    kept_advantages = [1.0] * 2 + [-2.0] * 3 if mode.startswith("token") else [-2.0] * 3  # weight 1 each
    assert abs(loss.item() - (-sum(kept_advantages) / 6)) < 1e-6, loss.item()  # dapo over 6 tokens
    assert logp.grad.isfinite().all() and logp.grad[0, 1].item() == 0.0
    assert abs(stats["is_clip_frac"].item() - (1 if mode.startswith("token") else 3) / 6) < 1e-6
    assert stats["is_weight_max"].item() == 1.0  # over the known weights
    if mode.startswith("token"):  # the fused LM head's per-token terms (update_loss) agree
        terms = policy_token_loss(mask.bool(), mask, A, opts, make_normalizer(mask), sampler_logp=sampler)
        value, grad = terms.value_and_grad(logp.detach().flatten(), 0, 6)
        assert abs(value.sum().item() - loss.item()) < 1e-6
        assert torch.allclose(grad, logp.grad.flatten(), atol=1e-6)
