"""GRPO math against hand-worked numbers: advantages, every loss type and option, split invariance."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from minigrpo.advantages import group_advantages, group_reward_stats, group_rows, zero_spread_groups
from minigrpo.config import Config
from minigrpo.grpo import (
    LOG_RATIO_CLAMP,
    LOSS_TYPES,
    LossNormalizer,
    LossOptions,
    importance_weights,
    kl_k3,
    loss_mask,
    make_normalizer,
    policy_loss,
)

NAN = float("nan")
LN = math.log


def lengths_mask(lengths: list[int], Tc: int) -> torch.Tensor:
    return torch.arange(Tc)[None, :] < torch.tensor(lengths)[:, None]  # (N, Tc) bool


def close(a: torch.Tensor | float, b: torch.Tensor | list | float, tol: float = 1e-5) -> None:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"got {a.tolist()}, expected {b.tolist()}"


# ----------------------------------------------------------------------------- the docstring example


def test_worked_example_of_the_module_docstring():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0, NAN, 0.0])
    A = group_advantages(rewards, 3)
    a0 = 1 / 1.0001  # group 1: mean 1, unbiased std 1
    a3 = 0.5 / (math.sqrt(0.5) + 1e-4)  # group 2: valid [1, 0], mean 0.5, std sqrt(0.5)
    close(A, [a0, -a0, 0.0, a3, 0.0, -a3], 1e-6)
    close(A[:4], [0.99990, -0.99990, 0.0, 0.70701], 1e-5)  # the numbers the docstring prints

    mask = lengths_mask([3, 1, 2, 2, 4, 4], 4)  # N_tok = 16
    expected = {"dapo": -0.036612, "bnpo": -0.036612, "dr_grpo": -0.024408, "grpo": 0.0}
    for loss_type, value in expected.items():
        logp = torch.randn(6, 4, requires_grad=True)
        loss, stats = policy_loss(logp, None, A, mask, LossOptions(loss_type=loss_type))
        close(loss, value, 2e-6)
        loss.backward()
        if loss_type == "dapo":
            close(logp.grad[0, :3], [-a0 / 16] * 3, 1e-6)
            close(logp.grad[0, :3], [-0.062494] * 3, 1e-6)
            assert (logp.grad[0, 3] == 0).item()
        if loss_type == "grpo":  # the loss is 0, its gradient is not
            close(logp.grad[0, :3], [-0.055550] * 3, 1e-6)
            close(logp.grad[3, :2], [-a3 / (6 * 2)] * 2, 1e-6)
        close(stats["ratio_mean"], 1.0, 0)
        close(stats["clip_region_frac"], 0.0, 0)


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_equal_rewards_give_exactly_zero_advantages(scale, estimator):
    rewards = torch.tensor([0.1, 0.1, 0.1, 7.0, 7.0, 7.0, 0.3, NAN, 0.3, NAN, NAN, NAN])
    A = group_advantages(rewards, 3, scale=scale, estimator=estimator)
    assert torch.equal(A, torch.zeros(12)), A.tolist()
    assert zero_spread_groups(rewards, 3).tolist() == [True, True, True, True]


def test_group_scale_uses_the_unbiased_std():
    A = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4)
    std = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)  # 1.29099 (biased would be 1.11803)
    close(A, [c / (std + 1e-4) for c in (-1.5, -0.5, 0.5, 1.5)], 1e-6)
    close(A[3], 1.16180, 1e-5)


def test_nan_rows_get_zero_advantage_and_stay_out_of_the_group_stats():
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, NAN, NAN])
    A = group_advantages(rewards, 3)
    a = 1 / (math.sqrt(2.0) + 1e-4)  # valid [1, 3]: mean 2, unbiased std sqrt(2)
    close(A, [-a, 0.0, a, 0.0, 0.0, 0.0], 1e-6)
    assert not A.isnan().any()
    stats = group_reward_stats(rewards, 3)
    close(stats["group_mean"][0], 2.0)
    assert stats["group_mean"][1].isnan()
    close(stats["group_std"], [math.sqrt(2.0), 0.0])
    close(stats["group_valid"], [2.0, 0.0])
    close(stats["frac_invalid_rows"], 4 / 6)
    close(stats["frac_zero_spread"], 0.5)
    close(stats["reward_mean"], 2.0)
    close(stats["reward_std"], math.sqrt(2.0))
    close(stats["reward_min"], 1.0)
    close(stats["reward_max"], 3.0)


def test_scale_none_keeps_the_group_mean_zero():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.5, 0.0, 0.25])
    A = group_advantages(rewards, 3, scale="none")
    close(A, [-2.0, -1.0, 3.0, 0.25, -0.25, 0.0], 1e-7)
    close(A.view(2, 3).sum(1), [0.0, 0.0], 1e-7)


def test_batch_scale_divides_by_the_batch_std():
    A = group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0]), 2, scale="batch")
    std = math.sqrt(14 / 3)  # [0, 1, 2, 5]: mean 2, squared deviations 4 + 1 + 0 + 9
    close(A, [c / (std + 1e-4) for c in (-0.5, 0.5, -1.5, 1.5)], 1e-6)


def test_rloo_leave_one_out_values():
    A = group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, estimator="rloo", scale="none")
    close(A, [1 - 4.0, 2 - 3.5, 6 - 1.5], 1e-6)  # r_i - mean of the other two
    # NaN rows are not members; one valid member has no baseline -> 0
    A = group_advantages(torch.tensor([1.0, NAN, 3.0, 5.0, NAN, 4.0, NAN, NAN]), 4, estimator="rloo", scale="none")
    close(A, [1 - 4.0, 0.0, 3 - 3.0, 5 - 2.0, 0.0, 0.0, 0.0, 0.0], 1e-6)
    # scale applies to rloo too: divided by the group's unbiased std sqrt(7)
    A = group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, estimator="rloo")
    close(A, [v / (math.sqrt(7.0) + 1e-4) for v in (-3.0, -1.5, 4.5)], 1e-6)


def test_advantage_argument_errors():
    with pytest.raises(AssertionError, match="multiple"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(4), 2, estimator="ppo")


# ----------------------------------------------------------------------------- dynamic sampling


def test_zero_spread_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 2.0, NAN, NAN, NAN, 3.0])
    assert zero_spread_groups(rewards, 2).tolist() == [True, False, True, True]


def test_row_helpers():
    assert group_rows(torch.tensor([False, True, True]), 2).tolist() == [2, 3, 4, 5]
    assert group_rows(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


# ----------------------------------------------------------------------------- KL and IS weights


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.randn(4, 7) * 3
    ref = torch.randn(4, 7) * 3
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros(4, 7))
    # d = ref - logp = ln 2: 2 - ln 2 - 1 = 0.306853; d = -1: e^-1 + 1 - 1 = 0.367879
    close(kl_k3(torch.tensor([[0.0, 0.0]]), torch.tensor([[LN(2), -1.0]])), [[0.306853, 0.367879]])
    # padding with -inf gives 0, not NaN
    out = kl_k3(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, -math.inf]]), torch.tensor([[1, 0]]))
    assert torch.equal(out, torch.zeros(1, 2))


def test_importance_weight_values():
    sampler = torch.zeros(1, 4)
    old = torch.tensor([[LN(4), LN(0.5), LN(2), 5.0]])  # last token is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    w, raw = importance_weights(old, sampler, mask, "token_truncate", cap=3.0)
    close(raw[0, :3], [4.0, 0.5, 2.0])
    close(w[0, :3], [3.0, 0.5, 2.0])
    w, _ = importance_weights(old, sampler, mask, "token_mask", cap=3.0)
    close(w[0, :3], [0.0, 0.5, 2.0])
    w, _ = importance_weights(old, sampler, mask, "token_truncate", cap=3.0, floor=0.6)
    close(w[0, :3], [3.0, 0.6, 2.0])
    w, _ = importance_weights(old, sampler, mask, "token_mask", cap=3.0, floor=0.6)
    close(w[0, :3], [0.0, 0.0, 2.0])
    # sequence modes: the product 4 * 0.5 * 2 = 4 (padding ignored)
    w, raw = importance_weights(old, sampler, mask, "sequence_truncate", cap=3.0)
    assert w.shape == (1, 1)
    close(raw, [[4.0]])
    close(w, [[3.0]])
    w, _ = importance_weights(old, sampler, mask, "sequence_mask", cap=5.0)
    close(w, [[4.0]])
    w, _ = importance_weights(old, sampler, mask, "sequence_mask", cap=3.0)
    close(w, [[0.0]])


# ----------------------------------------------------------------------------- policy loss


def _one_seq(log_ratios: list[float], adv: float):
    logp = torch.zeros(1, len(log_ratios), requires_grad=True)
    old = -torch.tensor([log_ratios])  # logp - old = log_ratios
    return logp, old, torch.tensor([adv]), torch.ones(1, len(log_ratios))


def test_clipping_positive_advantage():
    # ratios 1.5 and 0.5, A = +1, eps 0.2: token 0 takes the clipped 1.2 (no gradient), token 1 keeps 0.5
    logp, old, A, mask = _one_seq([LN(1.5), LN(0.5)], 1.0)
    loss, stats = policy_loss(logp, old, A, mask, LossOptions(loss_type="dapo"))
    close(loss, (-1.2 - 0.5) / 2)  # -0.85
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 2]])  # d(-rho A)/dlogp = -rho A, over N_tok = 2
    close(stats["clip_high_frac"], 0.5)
    close(stats["clip_low_frac"], 0.0)
    close(stats["clip_region_frac"], 0.5)
    close([stats["ratio_min"], stats["ratio_mean"], stats["ratio_max"]], [0.5, 1.0, 1.5])


def test_clipping_negative_advantage():
    # A = -1: token 0 (1.5) is unclipped, loss 1.5, gradient -rho A = 1.5; token 1 (0.5) takes the clipped 0.8
    logp, old, A, mask = _one_seq([LN(1.5), LN(0.5)], -1.0)
    loss, stats = policy_loss(logp, old, A, mask, LossOptions(loss_type="dapo"))
    close(loss, (1.5 + 0.8) / 2)
    loss.backward()
    close(logp.grad, [[1.5 / 2, 0.0]])
    close(stats["clip_low_frac"], 0.5)
    close(stats["clip_high_frac"], 0.0)


def test_epsilon_high_widens_the_upper_range():
    logp, old, A, mask = _one_seq([LN(1.25), LN(1.3)], 1.0)
    loss, stats = policy_loss(logp, old, A, mask, LossOptions(epsilon=0.2, epsilon_high=0.28))
    close(loss, (-1.25 - 1.28) / 2)  # 1.25 < 1.28 stays, 1.3 is clipped to 1.28
    loss.backward()
    close(logp.grad, [[-1.25 / 2, 0.0]])
    close(stats["clip_high_frac"], 0.5)


def test_delta_caps_the_ratio():
    # A = -1, ratio 3: unclipped term -3 would win; with delta 2 it is min(3, 2) = 2 and has no gradient
    logp, old, A, mask = _one_seq([LN(3.0)], -1.0)
    loss, _ = policy_loss(logp, old, A, mask, LossOptions())
    close(loss, 3.0)
    loss, _ = policy_loss(logp, old, A, mask, LossOptions(delta=2.0))
    close(loss, 2.0)
    loss.backward()
    close(logp.grad, [[0.0]])


def test_gspo_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    token_ratios = [2.0, 0.5, 4.0]
    logp = torch.tensor([[0.0, 0.0, 0.0, -math.inf]], requires_grad=True)  # padding is -inf
    old = torch.tensor([[-LN(r) for r in token_ratios] + [-math.inf]])
    mask = torch.tensor([[1, 1, 1, 0]])
    geo = math.prod(token_ratios) ** (1 / 3)  # 1.587401
    opts = LossOptions(loss_type="grpo", importance_sampling_level="sequence", epsilon=1.0, epsilon_high=1.0)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, opts)
    close(stats["ratio_mean"], geo, 1e-6)
    close(stats["ratio_min"], geo, 1e-6)
    close(loss, -geo, 1e-6)
    loss.backward()
    close(logp.grad, [[-geo / 3] * 3 + [0.0]], 1e-6)  # d/dlogp_t of -exp(mean_t log r) = -rho / |o|
    assert not logp.grad.isnan().any()


@pytest.mark.parametrize(
    "adv,loss_value,grad_rows,clip_low,clip_high",
    [
        (1.0, (-1.2 - 0.5) / 2, [0.0, -0.5 / 2 / 2], 0.0, 0.5),  # s = 2 clipped to 1.2; s = 0.5 kept
        (-1.0, (2.0 + 0.8) / 2, [2.0 / 2 / 2, 0.0], 0.5, 0.0),  # s = 2 kept; s = 0.5 clipped to 0.8
    ],
)
def test_gspo_clips_the_sequence_ratio_on_both_sides(adv, loss_value, grad_rows, clip_low, clip_high):
    """GSPO with eps 0.2, loss grpo: row 0 has token ratios [2, 2] (s = 2), row 1 [1/4, 1] + padding
    (s = 1/2). A clipped row has no gradient; a kept one d/dlogp_t (-s A) / N = -s A / (|o| N)."""
    logp = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf]], requires_grad=True)
    old = -torch.tensor([[LN(2), LN(2), 0.0], [LN(0.25), 0.0, -math.inf]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    opts = LossOptions(loss_type="grpo", importance_sampling_level="sequence")
    loss, stats = policy_loss(logp, old, torch.tensor([adv, adv]), mask, opts)
    close(loss, loss_value, 1e-6)
    loss.backward()
    close(logp.grad, [[grad_rows[0]] * 2 + [0.0], [grad_rows[1]] * 2 + [0.0]], 1e-6)
    close([stats["clip_low_frac"], stats["clip_high_frac"]], [clip_low, clip_high], 0)
    close([stats["ratio_min"], stats["ratio_max"]], [0.5, 2.0], 1e-6)


def test_is_correction_multiplies_the_policy_term_before_the_kl():
    logp = torch.zeros(1, 3, requires_grad=True)
    sampler = -torch.tensor([[LN(4), LN(0.5), LN(2)]])  # old (= logp) - sampler = ln [4, 0.5, 2]
    ref = logp.detach() - LN(2)  # k3 at d = -ln 2: 0.5 + ln 2 - 1 = 0.193147
    mask, A = torch.ones(1, 3), torch.tensor([1.0])
    truncate = LossOptions(is_correction="token_truncate", is_cap=3.0)
    loss, stats = policy_loss(logp, None, A, mask, truncate, sampler_logp=sampler)
    close(loss, -(3.0 + 0.5 + 2.0) / 3)
    with_kl = dataclasses.replace(truncate, beta=0.1)
    loss, stats = policy_loss(logp, None, A, mask, with_kl, sampler_logp=sampler, ref_logp=ref)
    close(loss, -(3.0 + 0.5 + 2.0) / 3 + 0.1 * 0.193147)  # -1.814019: KL not weighted
    close(stats["kl"], 0.193147)
    close(stats["pg_loss"], -(3.0 + 0.5 + 2.0) / 3)
    close([stats["is_weight_min"], stats["is_weight_mean"], stats["is_weight_max"]], [0.5, 6.5 / 3, 4.0])
    close(stats["is_clip_frac"], 1 / 3)
    masking = LossOptions(is_correction="token_mask", is_cap=3.0)
    loss, _ = policy_loss(logp, None, A, mask, masking, sampler_logp=sampler)
    close(loss, -(0.0 + 0.5 + 2.0) / 3)
    loss, _ = policy_loss(logp, None, A, mask, LossOptions(is_correction="sequence_truncate"), sampler_logp=sampler)
    close(loss, -3.0)  # product 4 -> 3 on every token


def test_kl_term_gradient_and_value():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[LN(2), 0.0]])
    loss, stats = policy_loss(logp, None, torch.tensor([0.0]), torch.ones(1, 2), LossOptions(beta=0.5), ref_logp=ref)
    close(loss, 0.5 * 0.306853 / 2)
    close(stats["kl"], 0.306853 / 2)
    loss.backward()
    # d k3 / d logp = -(exp(ref - logp) - 1) = -(2 - 1) on token 0, 0 on token 1
    close(logp.grad, [[0.5 * -1.0 / 2, 0.0]])


@pytest.mark.parametrize(
    "d,k3,kl_grad",
    [
        (-500.0, 499.0, 1.0),  # e^-500 + 500 - 1; gradient 1 - e^d: the pull back to the reference
        (500.0, math.exp(LOG_RATIO_CLAMP) - LOG_RATIO_CLAMP - 1, 0.0),  # e^20 - 21, frozen at the clamp
    ],
)
def test_k3_at_extreme_log_ratios_is_finite_and_keeps_the_restoring_gradient(d, k3, kl_grad):
    """|ref - logp| = 500 through policy_loss with beta > 0. d = ref - logp = -500: the policy made
    the token e^500 times likelier than the reference; k3 is finite without any lower clamp and its
    gradient beta * (1 - e^d) / N_tok pulls logp back (a lower clamp would zero it). d = +500: exp
    needs the upper clamp (e^500 is inf in fp32). The second token has d = 0 (k3 0)."""
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[d, 0.0]])
    loss, stats = policy_loss(logp, None, torch.tensor([1.0]), torch.ones(1, 2), LossOptions(beta=0.5), ref_logp=ref)
    assert loss.isfinite() and all(v.isfinite() for v in stats.values()), (loss, stats)
    close(stats["kl"], k3 / 2, 1e-6)
    close(loss, (-2.0 + 0.5 * k3) / 2, 1e-6)  # policy term -A per token, over N_tok = 2
    loss.backward()
    assert logp.grad.isfinite().all()
    close(logp.grad, [[(-1.0 + 0.5 * kl_grad) / 2, -1.0 / 2]], 1e-6)


def test_k3_upper_clamp_keeps_exp_finite():
    """Without the upper clamp, d = 500 makes exp overflow: k3 = inf and a NaN/inf gradient."""
    logp = torch.zeros(1, 2, requires_grad=True)
    k3 = kl_k3(logp, torch.tensor([[500.0, 1000.0]]))
    close(k3, [[math.exp(20.0) - 21.0] * 2], 1e-6)
    k3.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # frozen at the clamp
    # the lower side needs no clamp: exact values and gradient 1 - e^d at d = -500 and -1000
    logp = torch.zeros(1, 2, requires_grad=True)
    k3 = kl_k3(logp, torch.tensor([[-500.0, -1000.0]]))
    close(k3, [[499.0, 999.0]], 1e-7)
    k3.sum().backward()
    close(logp.grad, [[1.0, 1.0]], 0)


def test_on_policy_mu1_beta0_ratio_is_one_and_loss_is_minus_weighted_mean_advantage():
    N, Tc = 8, 6
    lengths = [6, 1, 3, 0, 5, 2, 6, 4]
    mask = lengths_mask(lengths, Tc)
    A = torch.randn(N)
    logp = torch.randn(N, Tc, requires_grad=True)
    sampler = logp.detach().clone()  # sampler agrees with the trainer: IS weight 1
    L = torch.tensor(lengths, dtype=torch.float32)
    opts = LossOptions(is_correction="token_truncate")
    loss, stats = policy_loss(logp, None, A, mask, opts, sampler_logp=sampler)
    close(loss, -(A * L).sum() / L.sum(), 1e-6)
    loss.backward()
    close(logp.grad, -A[:, None] * mask / L.sum(), 1e-6)
    for key in ("clip_low_frac", "clip_high_frac", "clip_region_frac"):
        assert stats[key].item() == 0.0
    for key in ("ratio_min", "ratio_max", "is_weight_min", "is_weight_max"):
        assert stats[key].item() == 1.0
    loss, _ = policy_loss(logp, None, A, mask, LossOptions(loss_type="grpo"))
    close(loss, -(A * (L > 0)).sum() / N, 1e-6)  # the mean of -A over sequences (empty rows give 0)


def test_fully_masked_rows_and_micro_batches_are_safe():
    logp = torch.tensor([[-1.0, -math.inf], [-math.inf, -math.inf]], requires_grad=True)
    old = torch.tensor([[-1.2, -math.inf], [-math.inf, -math.inf]])
    mask = torch.tensor([[1, 0], [0, 0]])
    for loss_type in LOSS_TYPES:
        opts = LossOptions(loss_type=loss_type, beta=0.1)
        loss, stats = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, opts, ref_logp=old)
        loss.backward()
        assert loss.isfinite() and not logp.grad.isnan().any()
        assert all(v.isfinite().all() for v in stats.values()), stats
        logp.grad = None
    loss, stats = policy_loss(logp[1:], old[1:], torch.tensor([1.0]), mask[1:], LossOptions())
    assert loss.item() == 0.0 and stats["ratio_mean"].item() == 1.0 and stats["active_tokens"].item() == 0


def test_extreme_log_ratio_is_clamped_not_inf():
    logp, old, A, mask = _one_seq([500.0], -1.0)
    loss, _ = policy_loss(logp, old, A, mask, LossOptions())
    close(loss, math.exp(20.0), 1e-5)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_entropy_stat_and_errors():
    mask = torch.tensor([[1, 1, 0]])
    entropy = torch.tensor([[1.0, 2.0, 100.0]])
    logp, zero = torch.zeros(1, 3), torch.zeros(1)
    _, stats = policy_loss(logp, None, zero, mask, LossOptions(), entropy=entropy)
    close(stats["entropy"], 1.5)
    assert "kl" not in stats and "is_weight_mean" not in stats
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, None, zero, mask, LossOptions(beta=0.1))
    with pytest.raises(ValueError, match="sampler_logp"):
        policy_loss(logp, None, zero, mask, LossOptions(is_correction="token_mask"))
    with pytest.raises(ValueError, match="made for 'dapo'"):
        policy_loss(logp, None, zero, mask, LossOptions(loss_type="grpo"), normalizer=make_normalizer(mask))
    with pytest.raises(ValueError, match="max_completion_length conflicts"):
        opts = LossOptions(max_completion_length=8)
        policy_loss(logp, None, zero, mask, opts, normalizer=make_normalizer(mask, max_completion_length=16))
    with pytest.raises(AssertionError, match="advantages"):
        policy_loss(logp, None, torch.zeros(2), mask, LossOptions())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("loss_type", "ppo", "loss_type must be one of"),
        ("importance_sampling_level", "group", "importance_sampling_level must be"),
        ("is_correction", "token_clip", "is_correction must be one of"),
    ],
)
def test_loss_options_reject_unknown_modes(field, value, match):
    with pytest.raises(ValueError, match=match):
        LossOptions(**{field: value})


def test_loss_options_from_config_reads_every_field():
    cfg = Config()
    g = cfg.grpo
    g.loss_type, g.epsilon, g.epsilon_high, g.delta, g.beta = "dr_grpo", 0.1, 0.28, 4.0, 0.04
    g.importance_sampling_level, g.is_correction, g.is_cap, g.is_min = "sequence", "token_mask", 2.5, 0.25
    cfg.sampler.max_new_tokens = 77
    opts = LossOptions.from_config(cfg)
    assert opts == LossOptions(
        loss_type="dr_grpo",
        epsilon=0.1,
        epsilon_high=0.28,
        delta=4.0,
        beta=0.04,
        importance_sampling_level="sequence",
        is_correction="token_mask",
        is_cap=2.5,
        is_min=0.25,
        max_completion_length=77,
    )
    assert [f.name for f in dataclasses.fields(LossOptions)] == [
        "loss_type",
        "epsilon",
        "epsilon_high",
        "delta",
        "beta",
        "importance_sampling_level",
        "is_correction",
        "is_cap",
        "is_min",
        "max_completion_length",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beta = 0.0  # type: ignore[misc]
    cfg.env.kind, cfg.env.max_episode_tokens = "tools", 300  # a row holds a whole episode: its budget is dr_grpo's
    assert LossOptions.from_config(cfg).max_completion_length == 300


def test_is_min_is_the_floor_of_the_importance_weights():
    """is_min reaches importance_weights as its floor: raw weights [4, 0.5, 2], cap 3, floor 0.6."""
    logp = torch.zeros(1, 3, requires_grad=True)
    sampler = -torch.tensor([[LN(4), LN(0.5), LN(2)]])
    mask, A = torch.ones(1, 3), torch.tensor([1.0])
    opts = LossOptions(is_correction="token_truncate", is_cap=3.0, is_min=0.6)
    loss, stats = policy_loss(logp, None, A, mask, opts, sampler_logp=sampler)
    close(loss, -(3.0 + 0.6 + 2.0) / 3)
    close(stats["is_clip_frac"], 2 / 3)  # 4 > cap, 0.5 < floor
    masked = dataclasses.replace(opts, is_correction="token_mask")
    loss, stats = policy_loss(logp, None, A, mask, masked, sampler_logp=sampler)
    close(loss, -(0.0 + 0.0 + 2.0) / 3)
    close(stats["is_weight_min"], 0.5)  # the raw weight, before the floor


# ----------------------------------------------------------------------------- normalisation


def test_loss_mask_and_normalizer():
    mask = lengths_mask([2, 3, 1], 4)
    m = loss_mask(mask, torch.tensor([False, True, False]), mask_truncated_completions=True)
    assert m.dtype == torch.float32 and m.sum(1).tolist() == [2.0, 0.0, 1.0]
    assert torch.equal(loss_mask(mask, torch.tensor([False, True, False])), mask.float())
    with pytest.raises(ValueError, match="truncated"):
        loss_mask(mask, mask_truncated_completions=True)
    n = make_normalizer(m, "dr_grpo", max_completion_length=16, num_micro_batches=3)
    assert n == LossNormalizer("dr_grpo", num_sequences=3, num_tokens=3, max_completion_length=16, num_micro_batches=3)
    assert make_normalizer(m).max_completion_length == 4


SPLITS = [[1] * 12, [2] * 6, [3] * 4, [4] * 3, [6] * 2, [12], [5, 7], [1, 3, 8], [2, 2, 3, 5], [11, 1]]


def _batch(N=12, Tc=9):
    lengths = [9, 1, 4, 0, 7, 2, 9, 3, 5, 6, 1, 8]  # varied, one fully masked row
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(N, Tc, generator=g) * 3
    old = logp + 0.3 * torch.randn(N, Tc, generator=g)  # off-policy: clipping engages
    ref = logp + 0.2 * torch.randn(N, Tc, generator=g)
    sampler = old + 0.1 * torch.randn(N, Tc, generator=g)
    A = torch.randn(N, generator=g)
    return logp, old, ref, sampler, A, lengths_mask(lengths, Tc)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_gradient_is_identical_for_every_micro_batch_split(loss_type, level):
    base, old, ref, sampler, A, mask = _batch()
    opts = LossOptions(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        epsilon_high=0.28,
        is_correction="token_truncate",
        max_completion_length=16,
    )
    full_logp = base.clone().requires_grad_()
    full_loss, _ = policy_loss(full_logp, old, A, mask, opts, ref_logp=ref, sampler_logp=sampler)
    full_loss.backward()
    assert full_logp.grad.abs().sum() > 0
    for split in SPLITS:
        norm = make_normalizer(mask, loss_type, max_completion_length=16, num_micro_batches=len(split))
        logp = base.clone().requires_grad_()
        total, start = 0.0, 0
        for size in split:
            rows = slice(start, start + size)
            loss, _ = policy_loss(
                logp[rows],
                old[rows],
                A[rows],
                mask[rows],
                opts,
                normalizer=norm,
                ref_logp=ref[rows],
                sampler_logp=sampler[rows],
            )
            loss.backward()  # accumulation: no division by the number of micro-batches
            total += loss.item()
            start += size
        err = (logp.grad - full_logp.grad).abs().max() / full_logp.grad.abs().max()
        assert err < 1e-6, f"split {split}: relative gradient error {err:.2e}"
        close(total, full_loss.item(), 1e-6)


def test_grpo_equals_bnpo_with_one_sequence_per_micro_batch():
    base, old, _, _, A, mask = _batch()
    grpo_logp = base.clone().requires_grad_()
    grpo_loss, _ = policy_loss(grpo_logp, old, A, mask, LossOptions(loss_type="grpo"))
    grpo_loss.backward()
    norm = make_normalizer(mask, "bnpo", num_micro_batches=12)
    logp, total = base.clone().requires_grad_(), 0.0
    for i in range(12):
        rows = slice(i, i + 1)
        loss, _ = policy_loss(
            logp[rows], old[rows], A[rows], mask[rows], LossOptions(loss_type="bnpo"), normalizer=norm
        )
        loss.backward()
        total += loss.item()
    close(total, grpo_loss.item(), 1e-6)
    close(logp.grad, grpo_logp.grad, 1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_ranks_losses_and_gradients_sum_to_the_whole_batch(loss_type):
    base, old, _, _, A, mask = _batch()
    full = base.clone().requires_grad_()
    opts = LossOptions(loss_type=loss_type, max_completion_length=9)
    whole = policy_loss(full, old, A, mask, opts)[0]
    whole.backward()
    # two ranks of 6 rows; the loop would all_reduce the totals, here they are built from the whole batch
    norm = LossNormalizer(loss_type, 12, int(mask.sum()), 9, num_micro_batches=1)
    grads, losses = [], []
    for rows in (slice(0, 6), slice(6, 12)):
        logp = base.clone().requires_grad_()
        loss = policy_loss(logp[rows], old[rows], A[rows], mask[rows], opts, normalizer=norm)[0]
        loss.backward()
        grads.append(logp.grad)
        losses.append(loss.item())
    close(sum(losses), whole.item(), 1e-6)
    close(grads[0] + grads[1], full.grad, 1e-6)  # what the summing gradient reduction gives


def test_normalizer_all_reduce_single_rank(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        n = make_normalizer(lengths_mask([2, 3], 5), "dapo").all_reduce()
    finally:
        dist.destroy_process_group()
    assert n == LossNormalizer("dapo", num_sequences=2, num_tokens=5, max_completion_length=5)
