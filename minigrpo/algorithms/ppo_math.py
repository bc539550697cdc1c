"""PPO math for language models: per-token rewards, GAE, whitening, clipped policy and value losses.

Pure tensor functions (torch only, no model code), each checked in tests/test_ppo.py against an fp64
reference written straight from these formulas. The update that uses them is algorithms/ppo.py.

Shapes: N sequences (rows), Tc completion length (right padded); `mask` (N, Tc) is 1 on the tokens
the policy produced (the actions). Position t of a row is the state "prompt + completion[:t]" whose
action is completion token t, so values[:, t] = V(state before token t).

The RLHF reward (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022)
    r_t = -kl_coef * (log pi_old(a_t) - log pi_ref(a_t))          on every action (k1 KL estimate)
    r_T += score                                                  on the row's last action
The sequence score is paid once, at the end; the KL penalty is paid per token, so the value of a
state counts the KL still to come.

Generalized Advantage Estimation (Schulman et al. 2016), over the actions of a row only
    delta_t = r_t + gamma * V_{t+1} - V_t        V after the last action is 0 (the episode ends)
    A_t     = delta_t + gamma * lam * A_{t+1}    A after the last action is 0
    R_t     = A_t + V_t                          the value targets (returns)
"t+1" is the row's next action: inactive positions (right padding, and the environment's tokens
inside a multi-turn row) are skipped, never read, and get A = R = 0. So padding cannot leak into
a row's numbers, and a multi-turn row is one episode whose steps are the model's tokens.
A truncated completion (max_new_tokens reached) is also treated as ended (no bootstrap), as
RLHF PPO implementations do.

PPO's clipped objectives (Schulman et al. 2017), with rho_t = exp(log pi(a_t) - log pi_old(a_t)):
    policy   l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)
    value    l_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
Both are summed over active tokens and divided by `num_tokens`, the active tokens of the whole
optimizer step (fixed before its first micro-batch), so the micro-batch losses of any split add up
to the full-batch loss and give the same gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # as grpo.py: exp() of a log-ratio beyond +-20 is frozen, never overflows
WHITEN_EPS = 1e-8


def _active(mask: Tensor) -> Tensor:
    return mask > 0


def per_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor | None, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """The RLHF reward of every action: -kl_coef * k1 KL, plus the row's score on its last action.

    Args:
        scores: (N,) sequence rewards (finite; rows without a score are masked out by the caller).
        logp: (N, Tc) log-probs of the sampling policy (pi_old), no grad.
        ref_logp: (N, Tc) reference log-probs, or None (no KL term; kl_coef must then be 0).
        mask: (N, Tc) 1 on actions.
        kl_coef: the KL penalty's weight (>= 0).

    Returns:
        rewards (N, Tc) and kl (N, Tc) = logp - ref_logp on actions (0 elsewhere, and all 0 without
        a reference). A row without actions gets no reward at all.
    """
    N, Tc = logp.shape
    assert mask.shape == (N, Tc) and scores.shape == (N,), f"mask {tuple(mask.shape)}, scores {tuple(scores.shape)}"
    active = _active(mask)
    if ref_logp is None:
        if kl_coef != 0:
            raise ValueError("kl_coef != 0 needs ref_logp")
        kl = torch.zeros_like(logp)
    else:
        assert ref_logp.shape == (N, Tc), f"ref_logp {tuple(ref_logp.shape)} vs {(N, Tc)}"
        kl = torch.where(active, logp - ref_logp, 0.0)  # (N, Tc) k1
    rewards = -kl_coef * kl  # (N, Tc)
    cols = torch.arange(Tc, device=logp.device)  # (Tc,)
    last = (cols * active).argmax(-1)  # (N,) the last action's column (0 for a row without any)
    has_action = active.any(-1)  # (N,)
    bonus = torch.where(has_action, scores.to(rewards.dtype), 0.0)  # (N,)
    rewards = rewards.index_put((torch.arange(N, device=logp.device), last), bonus, accumulate=True)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and returns over each row's actions (see the module docstring).

    Args:
        rewards, values: (N, Tc) per-action rewards and value estimates V(s_t) (no grad).
        mask: (N, Tc) 1 on actions; others are skipped (and read as nothing).
        gamma, lam: discount and GAE lambda, each in [0, 1].

    Returns:
        advantages (N, Tc) and returns = advantages + values (N, Tc), both 0 where mask is 0.
    """
    N, Tc = rewards.shape
    assert values.shape == (N, Tc) and mask.shape == (N, Tc)
    active = _active(mask)
    advantages = torch.zeros_like(rewards)  # (N, Tc)
    next_value = rewards.new_zeros(N)  # (N,) V of the next action's state; 0 past the last
    next_adv = rewards.new_zeros(N)  # (N,)
    for t in range(Tc - 1, -1, -1):
        on = active[:, t]  # (N,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(on, adv_t, 0.0)
        next_value = torch.where(on, values[:, t], next_value)  # skipped positions pass it through
        next_adv = torch.where(on, adv_t, next_adv)
    returns = torch.where(active, advantages + values, 0.0)
    return advantages, returns


def masked_mean_var(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (population) variance of x over the active entries; 0, 0 when there are none."""
    active = _active(mask)
    n = active.sum().clamp(min=1)
    mean = torch.where(active, x, 0.0).sum() / n
    var = torch.where(active, (x - mean).square(), 0.0).sum() / n
    return mean, var


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, moments: tuple[float, float] | None = None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the active entries (mean kept when shift_mean is False);
    inactive entries are 0. Advantages whitened over the whole step: a batch-wide baseline and scale.
    `moments`: the (mean, variance) to use, e.g. those of every rank's tokens (None: x's over mask)."""
    if moments is None:
        mean, var = masked_mean_var(x, mask)
    else:
        mean, var = (torch.tensor(m, dtype=x.dtype, device=x.device) for m in moments)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(_active(mask), out, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over active tokens: 1 is a perfect critic, 0 one that predicts a
    constant, < 0 worse than that. NaN when the returns do not vary."""
    _, var_r = masked_mean_var(returns, mask)
    _, var_err = masked_mean_var(returns - values, mask)
    return torch.where(var_r > 0, 1 - var_err / var_r.clamp(min=torch.finfo(var_r.dtype).tiny), torch.nan)


def _token_mean(x: Tensor, active: Tensor) -> Tensor:
    return torch.where(active, x, 0.0).sum() / active.sum().clamp(min=1)


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    num_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate of one micro-batch: sum_t m * l_t / num_tokens.

    Args:
        logp: (N, Tc) log-probs under the policy being trained (with grad).
        old_logp: (N, Tc) log-probs of the sampling policy (no grad).
        advantages: (N, Tc) per-token advantages (whitened or not).
        mask: (N, Tc) 1 on actions.
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        num_tokens: active tokens of the whole optimizer step (None: this micro-batch's).

    Returns:
        loss (0-dim) and detached stats of this micro-batch: pg_loss (token mean of l), clip_frac
        (tokens whose clipped term is the minimum, so they get no gradient), approx_kl (mean of
        k3 = rho - 1 - log rho, KL(pi_old || pi)), ratio_mean, ratio_max, active_tokens.
    """
    N, Tc = logp.shape
    assert old_logp.shape == (N, Tc) and advantages.shape == (N, Tc) and mask.shape == (N, Tc)
    active = _active(mask)
    log_ratio = torch.where(active, logp - old_logp, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (N, Tc)
    ratio = torch.exp(log_ratio)
    A = advantages.detach()
    unclipped = ratio * A
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A
    per_token = -torch.minimum(unclipped, clipped)  # (N, Tc)
    n = int(active.sum()) if num_tokens is None else num_tokens
    loss = torch.where(active, per_token, 0.0).sum() / max(n, 1)
    with torch.no_grad():
        stats = {
            "pg_loss": _token_mean(per_token, active),
            "clip_frac": _token_mean((clipped < unclipped).to(logp.dtype), active),
            "approx_kl": _token_mean(ratio - 1.0 - log_ratio, active),
            "ratio_mean": _token_mean(ratio, active),
            "ratio_max": torch.where(active, ratio, 0.0).max() if active.any() else ratio.new_ones(()),
            "active_tokens": active.sum().to(logp.dtype),
        }
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None,
    num_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped value loss of one micro-batch: sum_t m * 0.5 * max(err^2, err_clipped^2) / num_tokens.

    Args:
        values: (N, Tc) value estimates of the critic being trained (with grad).
        old_values: (N, Tc) the estimates at rollout time (no grad), the centre of the clip range.
        returns: (N, Tc) GAE returns (targets).
        mask: (N, Tc) 1 on actions.
        value_clip: c, the change of a value kept in [-c, c] in the clipped term (None: no clipping,
            plain 0.5 * (V - R)^2).
        num_tokens: active tokens of the whole optimizer step (None: this micro-batch's).

    Returns:
        loss (0-dim) and detached stats of this micro-batch: value_loss (token mean), value_clip_frac
        (tokens where the clipped error is the larger, so the clipped one is used).
    """
    N, Tc = values.shape
    assert old_values.shape == (N, Tc) and returns.shape == (N, Tc) and mask.shape == (N, Tc)
    active = _active(mask)
    R = returns.detach()
    err = (values - R).square()  # (N, Tc)
    if value_clip is None:
        per_token, clipped_used = 0.5 * err, torch.zeros_like(active)
    else:
        # V clamped into [V_old - c, V_old + c]: inside the range it is V itself, bit for bit (V_old +
        # clip(V - V_old) rounds), so its two errors tie there and it never counts as clipped
        v_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)  # (N, Tc)
        err_clipped = (v_clipped - R).square()
        per_token = 0.5 * torch.maximum(err, err_clipped)
        clipped_used = err_clipped > err
    n = int(active.sum()) if num_tokens is None else num_tokens
    loss = torch.where(active, per_token, 0.0).sum() / max(n, 1)
    with torch.no_grad():
        stats = {
            "value_loss": _token_mean(per_token, active),
            "value_clip_frac": _token_mean(clipped_used.to(values.dtype), active),
        }
    return loss, stats


__all__ = [
    "LOG_RATIO_CLAMP",
    "clipped_policy_loss",
    "clipped_value_loss",
    "explained_variance",
    "gae",
    "masked_mean_var",
    "per_token_rewards",
    "whiten",
]
