"""Group-relative advantages: one number per completion from the rewards of its group.

Pure tensor functions (torch only). The shape glossary and a worked example with these numbers are
in grpo.py's docstring, which re-exports everything here: the loop reads the whole objective as
grpo.*. Groups are contiguous: rows [g*G, (g+1)*G) answer prompt g; NaN marks a row where no reward
could be scored, which is left out of every mean and std and gets advantage 0. So does a reward of
+-inf (rewards.score already masks a function's non-finite score; a total can still overflow): one
infinite reward would otherwise turn its whole group's advantages (the whole batch's, with "batch"
scaling) into NaN, and the loss and every weight with them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- advantages


def _groups(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, G) fp64 rewards with non-finite ones zeroed, the (B, G) valid (finite) mask and the (B, 1) valid count."""
    assert rewards.ndim == 1, f"rewards must be (N,), got {tuple(rewards.shape)}"
    assert group_size >= 1 and rewards.numel() % group_size == 0, (
        f"N={rewards.numel()} is not a multiple of group_size={group_size}"
    )
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (B, G) fp64
    valid = torch.isfinite(r)  # (B, G): NaN (unscored) and +-inf are left out
    return torch.where(valid, r, 0.0), valid, valid.sum(1, keepdim=True)  # ..., (B, 1)


def zero_spread_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) bool: True where every valid reward of the group is equal, or the group has none.

    Such groups get zero advantage and so no policy gradient; DAPO's dynamic sampling drops them.
    """
    r, valid, _ = _groups(rewards, group_size)
    hi = torch.where(valid, r, -torch.inf).amax(1)  # (B,)
    lo = torch.where(valid, r, torch.inf).amin(1)  # (B,)
    return ~(hi > lo)  # no valid member: -inf > inf is False -> True


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    estimator: Literal["grpo", "rloo"] = "grpo",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages, one per sequence.

    Args:
        rewards: (N,) total rewards; NaN marks a row where no reward could be scored. Such rows, and
            rows of reward +-inf, get advantage 0 and are left out of every mean and std, so they
            poison nothing.
        group_size: G; rows [g*G, (g+1)*G) form group g.
        scale: divide by the group's unbiased (Bessel) std + eps ("group", GRPO), by the unbiased std of
            all valid rewards in the batch + eps ("batch"), or not at all ("none", Dr. GRPO: the group
            mean stays exactly zero). Applies to both estimators, so the plain RLOO advantage of TRL's
            RLOOTrainer (no std) is estimator="rloo" with scale="none".
        estimator: "grpo": A_i = r_i - mean_g(r). "rloo": A_i = r_i - mean_{j != i} r_j over the valid
            members, i.e. n/(n-1) * (r_i - mean_g(r)); a group with a single valid member has no
            leave-one-out baseline and gets 0. So does a single valid member under "grpo" (r_i - r_i;
            verl instead gives a group of one mean 0 and std 1, A = r).
        eps: added to the std.

    Returns:
        (N,) advantages, computed in fp64 and returned in fp32 (fp64 for fp64 rewards). Groups whose
        valid rewards are all equal get exactly 0 (not a rounding residue), which zero_spread_groups
        reports.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"estimator must be 'grpo' or 'rloo', got {estimator!r}")
    r, valid, n = _groups(rewards, group_size)  # (B, G), (B, G), (B, 1)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)  # (B, 1)
    centered = torch.where(valid, r - mean, 0.0)  # (B, G)
    flat = zero_spread_groups(rewards, group_size)[:, None]  # (B, 1)
    centered = torch.where(flat, 0.0, centered)
    if estimator == "rloo":
        adv = torch.where(n >= 2, centered * n / (n - 1).clamp(min=1), 0.0)  # (B, G)
    else:
        adv = centered
    if scale == "group":
        std = (centered.square().sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # (B, 1)
        adv = adv / (std + eps)
    elif scale == "batch":
        vals = r[valid]  # (n_valid,)
        std = vals.std(unbiased=True) if vals.numel() >= 2 else vals.new_zeros(())
        adv = adv / (std + eps)
    return adv.reshape(-1).to(torch.promote_types(rewards.dtype, torch.float32))  # (N,)


def group_reward_stats(rewards: Tensor, group_size: int) -> dict[str, Tensor]:
    """Diagnostics of the rewards of one step (why is the loss 0? -> frac_zero_spread).

    Returns detached fp64 tensors (the loop logs them as Python floats: a share such as 1/3 stays 1/3,
    not its fp32 rounding):
        group_mean (B,) (NaN for a group with no valid reward), group_std (B,) unbiased (0 with fewer
        than two valid rewards), group_valid (B,) count of valid rewards; 0-dim: frac_zero_spread
        (groups with zero advantage), frac_invalid_rows (NaN or +-inf rows), mean_group_std (over the
        groups with a valid reward: a group whose every row is masked has no spread to measure, and a
        0 for it would read as "all alike"; NaN if no group has one), reward_mean, reward_std,
        reward_min, reward_max (over valid rows; NaN if there are none).
    """
    r, valid, n = _groups(rewards, group_size)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)  # (B, 1)
    centered = torch.where(valid, r - mean, 0.0)
    std = (centered.square().sum(1) / (n[:, 0] - 1).clamp(min=1)).sqrt()  # (B,)
    std = torch.where(n[:, 0] >= 2, std, 0.0)
    scored = n[:, 0] > 0  # (B,) groups with a valid reward
    vals = r[valid]
    nan = r.new_tensor(float("nan"))
    stats = {
        "group_mean": torch.where(scored, mean[:, 0], nan),
        "group_std": std,
        "group_valid": n[:, 0],
        "frac_zero_spread": zero_spread_groups(rewards, group_size).double().mean(),
        "frac_invalid_rows": (~valid).double().mean(),
        "mean_group_std": std[scored].mean() if scored.any() else nan,
        "reward_mean": vals.mean() if vals.numel() else nan,
        "reward_std": vals.std() if vals.numel() >= 2 else (vals.new_zeros(()) if vals.numel() else nan),
        "reward_min": vals.min() if vals.numel() else nan,
        "reward_max": vals.max() if vals.numel() else nan,
    }
    return {k: v.to(torch.float64) for k, v in stats.items()}


# ----------------------------------------------------------------------------- dynamic sampling (DAPO)
# The loop (train.rollout_phase) keeps the rows of informative groups and refills the rest.


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """(k*G,) int64 row indices of the groups given as a (B,) bool mask or (k,) group indices."""
    idx = groups.nonzero().flatten() if groups.dtype == torch.bool else groups.long()  # (k,)
    offsets = torch.arange(group_size, device=idx.device)  # (G,)
    return (idx[:, None] * group_size + offsets).reshape(-1)  # (k*G,)
