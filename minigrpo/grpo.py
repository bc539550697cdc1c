"""GRPO math: group-relative advantages, the clipped policy loss and its variants, KL and IS weights.

Pure tensor functions (torch only, nothing of minigrpo): every formula here is checked on CPU against
hand-worked numbers in tests/test_grpo.py.

Shapes
    B prompts, G group size (completions per prompt), N = B*G sequences, Tc completion length (right
    padded), K reward functions. Groups are contiguous: rows [g*G, (g+1)*G) answer prompt g.

One optimizer step (the loop in train.py does this)
    r   = score(...).total                                # (N,) fp32, NaN where no reward was scored
    A   = group_advantages(r, G)                          # (N,)
    m   = loss_mask(completion_mask, truncated, mask_truncated_completions=...)   # (N, Tc)
    nrm = make_normalizer(m, "dapo", num_micro_batches=k) # ONCE, over the whole step's batch
    for rows in micro_batches:                            # any split of the N rows
        loss, stats = policy_loss(logp[rows], old[rows], A[rows], m[rows], normalizer=nrm)
        loss.backward()                                   # no division by k: the losses sum to the
    optimizer.step()                                      # full-batch loss, so the gradient is the same

    old_logp: with num_iterations (mu) == 1 and the trainer's own sampler, pass None: it means
    logp.detach(), the ratio is exactly 1 and the loss is plain REINFORCE with group baselines. With
    mu > 1 the loop computes old_logp once under no_grad before the first of the mu passes and reuses
    it; later passes move the ratio away from 1 and clipping engages. Nothing else changes here.

Worked example (B=2 prompts, G=3, scale="group", eps=1e-4, completion lengths 3 1 2 | 2 4 4, Tc=4)
    rewards     [2, 0, 1 | 1, NaN, 0]        NaN: every reward function failed on that row
    group 1     mean 1,   unbiased std 1       -> A = (r - 1) / 1.0001 = [0.99990, -0.99990, 0]
    group 2     valid [1, 0]: mean 0.5, std sqrt(0.5) = 0.70711
                                               -> A = +-0.5 / 0.70721 = [0.70701, 0, -0.70701]
    On-policy (old_logp=None, ratio 1) and beta=0, every token loss is -A_i, so with
    S = sum_i |o_i| * (-A_i) = -(3 - 1) * 0.99990 - (2 - 4) * 0.70701 = -0.58579:
    dapo     S / N_tok = -0.58579 / 16                          = -0.036612
    bnpo     the same on one micro-batch                        = -0.036612
    dr_grpo  S / (N * max_completion_length) = -0.58579 / 24    = -0.024408
    grpo     mean_i(-A_i) = 0 up to rounding (advantages sum to zero per group); its gradient is
             not zero: d loss / d logp[i, t] = -A_i / (N * |o_i|), e.g. -0.99990 / 18 = -0.055550
    dapo gradient: d loss / d logp[i, t] = -A_i / 16, e.g. -0.062494 for each token of row 0.

Numerical safety
    Log-ratios (policy/old, old/sampler, ref/policy) are zeroed on padding before any exp, so garbage
    or -inf log-probs there cannot make NaN, and clamped to +-LOG_RATIO_CLAMP (20) before exp: beyond
    e^20 ~ 5e8 a token is hopelessly off-policy, so its ratio is frozen there (no gradient flows
    through the clamp) instead of overflowing. Fully masked rows contribute exactly 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# ----------------------------------------------------------------------------- advantages


def _groups(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, G) fp64 rewards with NaN zeroed, the (B, G) valid mask and the (B, 1) valid count."""
    assert rewards.ndim == 1, f"rewards must be (N,), got {tuple(rewards.shape)}"
    assert group_size >= 1 and rewards.numel() % group_size == 0, (
        f"N={rewards.numel()} is not a multiple of group_size={group_size}"
    )
    r = rewards.detach().to(torch.float64).view(-1, group_size)  # (B, G) fp64
    valid = ~torch.isnan(r)  # (B, G)
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
        rewards: (N,) total rewards; NaN marks a row where no reward could be scored. Such rows get
            advantage 0 and are left out of every mean and std, so they poison nothing.
        group_size: G; rows [g*G, (g+1)*G) form group g.
        scale: divide by the group's unbiased (Bessel) std + eps ("group", GRPO), by the unbiased std of
            all valid rewards in the batch + eps ("batch"), or not at all ("none", Dr. GRPO: the group
            mean stays exactly zero). Applies to both estimators.
        estimator: "grpo": A_i = r_i - mean_g(r). "rloo": A_i = r_i - mean_{j != i} r_j over the valid
            members, i.e. n/(n-1) * (r_i - mean_g(r)); a group with a single valid member has no
            leave-one-out baseline and gets 0.
        eps: added to the std.

    Returns:
        (N,) fp32 advantages. Groups whose valid rewards are all equal get exactly 0 (not a rounding
        residue), which zero_spread_groups reports.
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
    return adv.reshape(-1).to(torch.float32)  # (N,)


def group_reward_stats(rewards: Tensor, group_size: int) -> dict[str, Tensor]:
    """Diagnostics of the rewards of one step (why is the loss 0? -> frac_zero_spread).

    Returns detached fp32 tensors:
        group_mean (B,) (NaN for a group with no valid reward), group_std (B,) unbiased (0 with fewer
        than two valid rewards), group_valid (B,) count of valid rewards; 0-dim: frac_zero_spread
        (groups with zero advantage), frac_invalid_rows (NaN rows), mean_group_std, reward_mean,
        reward_std, reward_min, reward_max (over valid rows; NaN if there are none).
    """
    r, valid, n = _groups(rewards, group_size)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)  # (B, 1)
    centered = torch.where(valid, r - mean, 0.0)
    std = (centered.square().sum(1) / (n[:, 0] - 1).clamp(min=1)).sqrt()  # (B,)
    std = torch.where(n[:, 0] >= 2, std, 0.0)
    vals = r[valid]
    nan = r.new_tensor(float("nan"))
    stats = {
        "group_mean": torch.where(n[:, 0] > 0, mean[:, 0], nan),
        "group_std": std,
        "group_valid": n[:, 0],
        "frac_zero_spread": zero_spread_groups(rewards, group_size).double().mean(),
        "frac_invalid_rows": (~valid).double().mean(),
        "mean_group_std": std.mean(),
        "reward_mean": vals.mean() if vals.numel() else nan,
        "reward_std": vals.std() if vals.numel() >= 2 else (vals.new_zeros(()) if vals.numel() else nan),
        "reward_min": vals.min() if vals.numel() else nan,
        "reward_max": vals.max() if vals.numel() else nan,
    }
    return {k: v.to(torch.float32) for k, v in stats.items()}


# ----------------------------------------------------------------------------- dynamic sampling (DAPO)
# The loop (train.rollout_phase) keeps the rows of informative groups and refills the rest.


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """(k*G,) int64 row indices of the groups given as a (B,) bool mask or (k,) group indices."""
    idx = groups.nonzero().flatten() if groups.dtype == torch.bool else groups.long()  # (k,)
    offsets = torch.arange(group_size, device=idx.device)  # (G,)
    return (idx[:, None] * group_size + offsets).reshape(-1)  # (k*G,)


# ----------------------------------------------------------------------------- masks, KL, IS weights


def loss_mask(mask: Tensor, truncated: Tensor | None = None, *, mask_truncated_completions: bool = False) -> Tensor:
    """(N, Tc) fp32 loss mask: the completion mask, with truncated rows zeroed if asked.

    The one place mask_truncated_completions is applied: build the mask here once and give the same
    mask to make_normalizer and policy_loss, so the dapo token count only counts surviving tokens.
    Truncated rows then contribute nothing, not even KL.
    """
    m = mask.to(torch.float32)  # (N, Tc)
    if mask_truncated_completions:
        if truncated is None:
            raise ValueError("mask_truncated_completions needs the (N,) truncated flags")
        assert truncated.shape == (m.shape[0],), f"truncated {tuple(truncated.shape)} vs N={m.shape[0]}"
        m = m * (~truncated.bool()).to(m.dtype)[:, None]
    return m


def _masked_log_ratio(a: Tensor, b: Tensor, active: Tensor) -> Tensor:
    """a - b on active tokens, 0 on padding (so -inf or garbage there cannot make NaN)."""
    return torch.where(active, a.float() - b.float(), 0.0)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp; >= 0, 0 at equality.

    d is clamped to +-LOG_RATIO_CLAMP; padding (mask 0) gives 0.
    """
    active = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask > 0
    d = _masked_log_ratio(ref_logp, logp, active).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (N, Tc)
    return torch.exp(d) - d - 1.0


@torch.no_grad()
def importance_weights(
    old_logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    mode: str,
    *,
    cap: float = 3.0,
    floor: float | None = None,
) -> tuple[Tensor, Tensor]:
    """IS weights that correct for an external sampler (vLLM) whose log-probs differ from the trainer's.

    token modes: w[i, t] = exp(old - sampler); sequence modes: w_i = exp(sum_t m * (old - sampler)),
    the product of the token ratios, broadcast to (N, 1). *_truncate: clamp(w, floor, cap);
    *_mask: w * [floor <= w <= cap] (no lower bound when floor is None). The log-weight is clamped to
    +-LOG_RATIO_CLAMP before exp.

    Returns (corrected w, raw w), each (N, Tc) or (N, 1); no gradient.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"is_correction must be one of {IS_CORRECTIONS}, got {mode!r}")
    d = _masked_log_ratio(old_logp, sampler_logp, mask > 0)  # (N, Tc)
    if mode.startswith("sequence"):
        d = d.sum(1, keepdim=True)  # (N, 1)
    raw = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        return raw.clamp(min=floor, max=cap), raw
    keep = raw <= cap
    if floor is not None:
        keep &= raw >= floor
    return raw * keep, raw


# ----------------------------------------------------------------------------- loss normalisation


@dataclasses.dataclass(frozen=True)
class LossNormalizer:
    """The denominators of one optimizer step, fixed before its first micro-batch.

    Because every micro-batch divides by the same totals, summing the micro-batch losses of any split
    gives the full-batch loss, so accumulated gradients are identical for every split (grpo, dr_grpo,
    dapo); the caller never divides by the number of accumulation steps.

    loss_type: the loss these totals are for (checked by policy_loss).
    num_sequences: rows in the step, all ranks (grpo, dr_grpo), fully masked rows included.
    num_tokens: active (mask 1) tokens in the step, all ranks (dapo).
    max_completion_length: the dr_grpo constant (the configured maximum, not a batch's padded Tc).
    num_micro_batches: micro-batches per rank in the step (bnpo only).
    world_size: ranks whose gradients data parallelism AVERAGES; the global-sum losses are multiplied
        by it so the averaged gradient is the global sum over the global totals. 1 without DDP.
    """

    loss_type: str
    num_sequences: int
    num_tokens: int
    max_completion_length: int
    num_micro_batches: int = 1
    world_size: int = 1

    def all_reduce(self, group: Any = None, device: torch.device | str | None = None) -> LossNormalizer:
        """Totals summed over the ranks of group (torch.distributed must be initialised).

        device: where the reduction tensor lives (a CUDA device for NCCL; CPU for gloo).
        """
        import torch.distributed as dist

        counts = torch.tensor([self.num_sequences, self.num_tokens], dtype=torch.int64, device=device)
        length = torch.tensor([self.max_completion_length], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
        return dataclasses.replace(
            self,
            num_sequences=int(counts[0]),
            num_tokens=int(counts[1]),
            max_completion_length=int(length[0]),
            world_size=dist.get_world_size(group),
        )


def make_normalizer(
    mask: Tensor,
    loss_type: str = "dapo",
    *,
    max_completion_length: int | None = None,
    num_micro_batches: int = 1,
) -> LossNormalizer:
    """Normalizer of one optimizer step from the (N, Tc) loss mask of the WHOLE step (this rank).

    max_completion_length defaults to Tc; give the configured maximum so dr_grpo's scale does not
    change with the padding of each batch. In the distributed case follow with .all_reduce().
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    assert mask.ndim == 2, f"mask must be (N, Tc), got {tuple(mask.shape)}"
    return LossNormalizer(
        loss_type=loss_type,
        num_sequences=mask.shape[0],
        num_tokens=int((mask > 0).sum()),
        max_completion_length=int(max_completion_length or mask.shape[1]),
        num_micro_batches=num_micro_batches,
    )


# ----------------------------------------------------------------------------- policy loss


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    normalizer: LossNormalizer | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    max_completion_length: int | None = None,
    sampler_logp: Tensor | None = None,
    is_correction: str | None = None,
    is_cap: float = 3.0,
    is_min: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate (+ k3 KL) of one micro-batch, normalised for gradient accumulation.

    Per token: l = -min(rho' * A, clamp(rho, 1 - epsilon, 1 + epsilon_high) * A), rho' = min(rho, delta)
    if delta is set (two-sided clipping) else rho; then l *= IS weight (is_correction); then
    l += beta * k3(ref, logp). Aggregation with S = sum(m * l) over this micro-batch and the totals of
    normalizer (world_size factor omitted here, see LossNormalizer):
        grpo     sum_i (sum_t m l / max(|o_i|, 1)) / num_sequences   (the mean of per-sequence means)
        dr_grpo  S / (num_sequences * max_completion_length)
        dapo     S / num_tokens                                      (token mean over the whole step)
        bnpo     S / max(micro-batch tokens, 1) / num_micro_batches  (a token mean over each
                 micro-batch by definition, so NOT invariant to the split: it equals grpo when every
                 micro-batch holds one sequence)

    Args:
        logp: (N, Tc) log-probs of the completion tokens under the policy (with grad).
        old_logp: (N, Tc) log-probs at sampling time (no grad), or None for logp.detach() (ratio 1).
        advantages: (N,).
        mask: (N, Tc) bool or float loss mask, 1 on active tokens. It already holds
            mask_truncated_completions: build it once with loss_mask() and give the same mask to
            make_normalizer, so the loss and its token count can never disagree.
        normalizer: the step's totals from make_normalizer(); None treats this micro-batch as the
            whole step (then max_completion_length defaults to Tc).
        epsilon, epsilon_high: lower and upper clip range (epsilon_high defaults to epsilon).
        importance_sampling_level: "token" rho = exp(logp - old); "sequence" (GSPO)
            rho_i = exp(sum_t m (logp - old) / max(|o_i|, 1)), the geometric mean of the token
            ratios, broadcast to the tokens.
        ref_logp: (N, Tc) reference log-probs; needed when beta != 0; if given, the KL is reported.
        sampler_logp, is_correction, is_cap, is_min: see importance_weights().
        entropy: (N, Tc) optional per-token entropy, only reported.

    Returns:
        loss: 0-dim fp32.
        stats: detached 0-dim fp32 tensors of this micro-batch: pg_loss (per-token policy term after
            IS weighting, mean over active tokens), clip_low_frac (rho < 1-eps with A < 0),
            clip_high_frac (rho > 1+eps_high with A > 0), clip_region_frac (either), ratio_min,
            ratio_mean, ratio_max, active_tokens; kl (mean k3) if ref_logp is given; is_weight_min,
            is_weight_mean, is_weight_max (of the raw weight, before truncation or masking) and
            is_clip_frac (raw weight outside [is_min, is_cap]) with is_correction; entropy if given.
            Token statistics are 1 (ratios) or 0 on a micro-batch with no active token.
    """
    N, Tc = logp.shape
    assert mask.shape == (N, Tc), f"mask {tuple(mask.shape)} vs logp {(N, Tc)}"
    assert advantages.shape == (N,), f"advantages {tuple(advantages.shape)} vs N={N}"
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp)):
        assert t is None or t.shape == (N, Tc), f"{name} {tuple(t.shape)} vs logp {(N, Tc)}"
    assert entropy is None or entropy.shape == (N, Tc), f"entropy {tuple(entropy.shape)} vs {(N, Tc)}"
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if is_correction is not None and sampler_logp is None:
        raise ValueError(f"is_correction={is_correction!r} needs sampler_logp")
    if normalizer is None:
        normalizer = make_normalizer(mask, loss_type, max_completion_length=max_completion_length)
    elif normalizer.loss_type != loss_type:
        raise ValueError(f"normalizer was made for {normalizer.loss_type!r}, not {loss_type!r}")
    elif max_completion_length is not None and max_completion_length != normalizer.max_completion_length:
        raise ValueError("max_completion_length conflicts with normalizer.max_completion_length")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high

    m = mask.to(torch.float32)  # (N, Tc)
    active = m > 0  # (N, Tc)
    seq_len = m.sum(1)  # (N,)
    old = logp.detach() if old_logp is None else old_logp
    A = advantages.detach().to(torch.float32)[:, None]  # (N, 1)

    # ratio
    log_ratio = _masked_log_ratio(logp, old, active)  # (N, Tc)
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio.sum(1) / seq_len.clamp(min=1))[:, None]  # (N, 1)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (N, Tc) or (N, 1)

    # clipped surrogate
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    capped = ratio if delta is None else ratio.clamp(max=delta)
    per_token = -torch.minimum(capped * A, clipped * A).expand(N, Tc)  # (N, Tc)

    stats: dict[str, Tensor] = {}
    if is_correction is not None:
        w, raw = importance_weights(old, sampler_logp, m, is_correction, cap=is_cap, floor=is_min)
        per_token = per_token * w
        raw = raw.expand(N, Tc)
        outside = (raw > is_cap) | (raw < is_min if is_min is not None else torch.zeros_like(active))
        stats |= _masked_min_mean_max("is_weight", raw, active)
        stats["is_clip_frac"] = _masked_mean(outside.float(), active)
    pg = per_token
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp, m)  # (N, Tc)
        if beta != 0.0:
            per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl, active)

    # aggregation
    n = normalizer
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / seq_len.clamp(min=1)).sum() / max(n.num_sequences, 1) * n.world_size
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / max(n.num_sequences * n.max_completion_length, 1) * n.world_size
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / max(n.num_tokens, 1) * n.world_size
    else:  # bnpo
        loss = (per_token * m).sum() / m.sum().clamp(min=1) / n.num_micro_batches

    # stats
    ratio_t = ratio.expand(N, Tc)
    low = (ratio_t < 1.0 - eps_low) & (A < 0)
    high = (ratio_t > 1.0 + eps_high) & (A > 0)
    stats["pg_loss"] = _masked_mean(pg, active)
    stats["clip_low_frac"] = _masked_mean(low.float(), active)
    stats["clip_high_frac"] = _masked_mean(high.float(), active)
    stats["clip_region_frac"] = _masked_mean((low | high).float(), active)
    stats |= _masked_min_mean_max("ratio", ratio_t, active)
    stats["active_tokens"] = m.sum()
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy.float(), active)
    return loss, {k: v.detach().float() for k, v in stats.items()}


def _masked_mean(x: Tensor, active: Tensor) -> Tensor:
    return torch.where(active, x, 0.0).sum() / active.sum().clamp(min=1)


def _masked_min_mean_max(prefix: str, x: Tensor, active: Tensor) -> dict[str, Tensor]:
    x = x.detach().float()
    if not active.any():
        one = x.new_ones(())
        return {f"{prefix}_min": one, f"{prefix}_mean": one, f"{prefix}_max": one}
    return {
        f"{prefix}_min": x[active].min(),
        f"{prefix}_mean": x[active].mean(),
        f"{prefix}_max": x[active].max(),
    }
