"""PPO's math (minigrpo/algorithms/ppo_math.py) against fp64 references written from the papers, one
token at a time: per-token RLHF rewards, GAE (Schulman et al. 2016) over ragged rows, whitening,
explained variance, PPO's clipped policy and value losses (Schulman et al. 2017) and their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from minigrpo.algorithms.ppo_math import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    per_token_rewards,
    whiten,
)

# ================================================================================================
# references, one token at a time (plain Python floats)


def ragged(N=5, Tc=7, seed=0, gaps=False):
    """fp64 logp, ref, values, scores and a ragged right-padded mask (one row empty, one full);
    gaps: holes inside rows too (a multi-turn row's environment tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, Tc, 0, 1, 5][:N]
    mask = torch.zeros(N, Tc, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    if gaps:
        mask[1, 2:4] = 0
        mask[4, 1] = 0
    logp = -torch.rand(N, Tc, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(N, Tc, generator=g, dtype=torch.float64) * 3
    values = torch.randn(N, Tc, generator=g, dtype=torch.float64)
    scores = torch.randn(N, generator=g, dtype=torch.float64)
    garbage = torch.full_like(logp, float("nan"))  # padding must never be read
    logp, ref, values = (torch.where(mask > 0, x, garbage) for x in (logp, ref, values))
    return logp, ref, values, scores, mask


def ref_rewards(scores, logp, ref, mask, kl_coef):
    out = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i in range(mask.shape[0]):
        steps = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        for t in steps:
            out[i][t] = -kl_coef * (float(logp[i, t]) - float(ref[i, t]))
        if steps:
            out[i][steps[-1]] += float(scores[i])
    return torch.tensor(out, dtype=torch.float64)


def ref_gae(rewards, values, mask, gamma, lam):
    """Schulman et al. (2016), eq. 16, over a row's actions: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lam)^l delta_{t+l}, with V = 0 after the last action."""
    adv = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i in range(mask.shape[0]):
        steps = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        v = [float(values[i, t]) for t in steps] + [0.0]
        deltas = [float(rewards[i, t]) + gamma * v[k + 1] - v[k] for k, t in enumerate(steps)]
        for k, t in enumerate(steps):
            adv[i][t] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(steps) - k))
    adv = torch.tensor(adv, dtype=torch.float64)
    return adv, torch.where(mask > 0, adv + torch.nan_to_num(values), 0.0)


def active_values(x, mask):
    return [float(x[i, t]) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t] > 0]


# ================================================================================================
# the math


@pytest.mark.parametrize("gaps", [False, True], ids=["right_padded", "with_gaps"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_loop_reference(gamma, lam, gaps):
    logp, ref, values, scores, mask = ragged(gaps=gaps)
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    expected_rewards = ref_rewards(scores, logp, ref, mask, 0.1)
    assert torch.allclose(rewards, expected_rewards, rtol=0, atol=1e-12)
    assert (kl[mask == 0] == 0).all()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = ref_gae(expected_rewards, values, mask, gamma, lam)
    assert not adv.isnan().any() and not ret.isnan().any(), "padding leaked into the estimates"
    assert torch.allclose(adv, want_adv, rtol=0, atol=1e-12), (adv - want_adv).abs().max()
    assert torch.allclose(ret, want_ret, rtol=0, atol=1e-12)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_worked_and_row_independence():
    """One row of 3 tokens, score 1 at the end, V = 0.5 everywhere, gamma = lam = 1: every advantage
    is 1 - 0.5 = 0.5 (Monte Carlo return minus value), the returns are 1. With lam = 0 (TD(0)):
    A = [0, 0, 0.5]. A row computed alone equals the same row inside a padded batch."""
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.full((1, 3), 0.5, dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.float64)
    adv, ret = gae(r, v, m, 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    adv, _ = gae(r, v, m, 1.0, 0.0)
    assert adv.tolist() == [[0.0, 0.0, 0.5]]
    logp, ref, values, scores, mask = ragged()
    rewards, _ = per_token_rewards(scores, logp, ref, mask, 0.2)
    batch, _ = gae(rewards, values, mask, 0.97, 0.9)
    for i in range(mask.shape[0]):  # each row alone, cut to its own length (no padding at all)
        n = int(mask[i].sum())
        alone, _ = gae(rewards[i : i + 1, :n], values[i : i + 1, :n], mask[i : i + 1, :n], 0.97, 0.9)
        assert torch.equal(alone[0], batch[i, :n]) and (batch[i, n:] == 0).all()


def test_rewards_without_reference_and_empty_rows():
    logp, _, _, scores, mask = ragged()
    rewards, kl = per_token_rewards(scores, logp, None, mask, 0.0)
    assert (kl == 0).all()
    assert rewards[2].abs().sum() == 0  # the row without actions gets nothing
    assert rewards[0].tolist() == [0.0, 0.0, float(scores[0]), 0, 0, 0, 0]
    with pytest.raises(ValueError, match="kl_coef"):
        per_token_rewards(scores, logp, None, mask, 0.1)


def test_whitening_and_explained_variance():
    logp, _, values, _, mask = ragged()
    x = torch.where(mask > 0, logp * 3 + 2, 123.0)  # padding holds junk that must not count
    w = whiten(x, mask)
    vals = active_values(x, mask)
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals) + 1e-8)
    assert torch.allclose(w, torch.where(mask > 0, (x - mu) / sd, 0.0), rtol=0, atol=1e-12)
    got = active_values(w, mask)
    assert abs(sum(got) / len(got)) < 1e-12 and abs(sum(g * g for g in got) / len(got) - 1) < 1e-7
    kept = whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept, torch.where(mask > 0, (x - mu) / sd + mu, 0.0), atol=1e-12)
    # explained variance: 1 - Var(R - V) / Var(R) over active tokens
    R = torch.where(mask > 0, x, 0.0)
    V = torch.where(mask > 0, torch.nan_to_num(values), 0.0)
    r, e = active_values(R, mask), [a - b for a, b in zip(active_values(R, mask), active_values(V, mask))]

    def var(z):
        m = sum(z) / len(z)
        return sum((v - m) ** 2 for v in z) / len(z)

    assert float(explained_variance(V, R, mask)) == pytest.approx(1 - var(e) / var(r), abs=1e-12)
    assert float(explained_variance(R, R, mask)) == 1.0
    assert math.isnan(float(explained_variance(V, torch.ones_like(R), mask)))


def test_clipped_losses_match_the_formulas():
    """Schulman et al. (2017): l = -min(rho A, clip(rho, 1-eps, 1+eps) A) and the clipped value loss
    0.5 max((V-R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), summed over actions / num_tokens; and
    their gradients (autograd against the per-token derivative written by hand)."""
    logp_old, _, old_values, _, mask = ragged(seed=3)
    g = torch.Generator().manual_seed(4)
    logp = (
        torch.nan_to_num(logp_old) + torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.3
    ).requires_grad_()
    adv = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values = torch.nan_to_num(old_values) + torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.4
    values.requires_grad_()
    returns = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    eps, c, n = 0.2, 0.25, 40
    loss, stats = clipped_policy_loss(logp, logp_old, adv, mask, eps, num_tokens=n)
    vloss, vstats = clipped_value_loss(values, old_values, returns, mask, c, num_tokens=n)
    loss.backward()
    vloss.backward()

    total, vtotal, clipped, vclipped, k3 = 0.0, 0.0, 0, 0, 0.0
    grad = torch.zeros_like(logp)
    vgrad = torch.zeros_like(values)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t] == 0:
                continue
            rho = math.exp(float(logp.detach()[i, t]) - float(logp_old[i, t]))
            a = float(adv[i, t])
            unclipped, clip_term = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            total += -min(unclipped, clip_term)
            clipped += clip_term < unclipped
            grad[i, t] = -rho * a / n if unclipped <= clip_term else 0.0
            k3 += rho - 1 - math.log(rho)
            v, v0, R = float(values.detach()[i, t]), float(old_values[i, t]), float(returns[i, t])
            vc = v0 + min(max(v - v0, -c), c)
            e1, e2 = (v - R) ** 2, (vc - R) ** 2
            vtotal += 0.5 * max(e1, e2)
            vclipped += e2 > e1
            vgrad[i, t] = (v - R) / n if e1 >= e2 else ((vc - R) / n if abs(v - v0) < c else 0.0)
    tokens = int(mask.sum())
    assert float(loss.detach()) == pytest.approx(total / n, abs=1e-12)
    assert float(vloss.detach()) == pytest.approx(vtotal / n, abs=1e-12)
    assert torch.allclose(logp.grad, grad, atol=1e-12) and torch.allclose(values.grad, vgrad, atol=1e-12)
    assert float(stats["clip_frac"]) == pytest.approx(clipped / tokens) and 0 < clipped < tokens
    assert float(stats["approx_kl"]) == pytest.approx(k3 / tokens, abs=1e-12)
    assert float(vstats["value_clip_frac"]) == pytest.approx(vclipped / tokens) and 0 < vclipped < tokens
    assert float(stats["active_tokens"]) == tokens
    # unclipped value loss: plain 0.5 (V - R)^2
    plain, _ = clipped_value_loss(values.detach(), old_values, returns, mask, None)
    want = sum(0.5 * (a - b) ** 2 for a, b in zip(active_values(values.detach(), mask), active_values(returns, mask)))
    assert float(plain) == pytest.approx(want / tokens, abs=1e-12)


def test_on_policy_ratio_is_one_and_the_gradient_is_reinforce():
    """At rho = 1 nothing is clipped and d loss / d logp = -A / num_tokens (the policy gradient)."""
    _, _, _, _, mask = ragged(seed=5)
    logp = torch.randn(mask.shape, dtype=torch.float64).requires_grad_()
    adv = torch.randn(mask.shape, dtype=torch.float64)
    loss, stats = clipped_policy_loss(logp, logp.detach(), adv, mask, 0.2)
    loss.backward()
    n = int(mask.sum())
    assert torch.allclose(logp.grad, torch.where(mask > 0, -adv / n, 0.0), atol=1e-15)
    assert float(stats["clip_frac"]) == 0 and float(stats["approx_kl"]) == 0 and float(stats["ratio_mean"]) == 1
