"""GRPO math: group-relative advantages, the clipped policy loss and its variants, KL and IS weights.

Pure tensor functions (torch only; the advantages live in advantages.py and are re-exported here, so
the whole objective reads as grpo.*): every formula is checked on CPU against hand-worked numbers in
tests/test_grpo.py.

Shapes
    B prompts, G group size (completions per prompt), N = B*G sequences, Tc completion length (right
    padded), K reward functions. Groups are contiguous: rows [g*G, (g+1)*G) answer prompt g.

One optimizer step (step.py's update_phase does this)
    opts = LossOptions.from_config(cfg)                   # once per run: the loss settings
    r   = score(...).total                                # (N,) fp64, NaN where no reward was scored
    A   = group_advantages(r, G)                          # (N,) fp64; policy_loss casts to its dtype
    m   = loss_mask(completion_mask, truncated, mask_truncated_completions=...)   # (N, Tc)
    nrm = make_normalizer(m, "dapo", num_micro_batches=k) # ONCE, over the whole step's batch
    for rows in micro_batches:                            # any split of the N rows
        loss, stats = policy_loss(logp[rows], old[rows], A[rows], m[rows], opts, normalizer=nrm)
        loss.backward()                                   # no division by k: the losses sum to the
    optimizer.step()                                      # full-batch loss, so the gradient is the same

    old_logp: None with num_iterations (mu) == 1 and the own sampler (logp.detach(): ratio exactly 1,
    plain REINFORCE with group baselines); with mu > 1 the loop takes it once under no_grad before the
    first pass and reuses it, so later passes move the ratio away from 1 and clipping engages.

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
    Log-ratios (policy/old, old/sampler, ref/policy) are zeroed on padding before any exp (-inf or
    garbage there cannot make NaN). policy/old and old/sampler are clamped to +-LOG_RATIO_CLAMP (20)
    before exp: beyond e^20 a token is hopelessly off-policy, its ratio frozen (no gradient through
    the clamp). The KL's d = ref - logp is clamped above only: for d -> -inf, k3 -> -d - 1 stays finite
    and keeps its restoring gradient. Fully masked rows contribute exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from minigrpo.advantages import group_advantages, group_reward_stats, group_rows, zero_spread_groups
from minigrpo.env_config import completion_budget

if TYPE_CHECKING:
    from minigrpo.config import Config

LOG_RATIO_CLAMP = 20.0
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_OPTIONAL_NUMBERS = ("delta", "is_min", "max_completion_length")  # LossOptions' numbers that may be None


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


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for every input dtype up to fp32 (bf16 log-probs are upcast), fp64 if one input is fp64."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)


def _masked_log_ratio(a: Tensor, b: Tensor, active: Tensor) -> Tensor:
    """a - b on active tokens in _compute_dtype, 0 on padding (so -inf or garbage there cannot make NaN)."""
    dt = _compute_dtype(a, b)
    return torch.where(active, a.to(dt) - b.to(dt), 0.0)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp; >= 0, 0 at equality.

    In fp64: fp32 rounds exp(d) near 1 to 6e-8, which swamps k3 ~ d^2 / 2 for |d| < 1e-3 (even below 0).
    d is clamped above at LOG_RATIO_CLAMP (exp cannot overflow) and not below: a token the policy
    made far likelier than the reference keeps k3 ~ -d - 1 and its gradient. Padding gives 0.
    """
    active = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask > 0
    d = _masked_log_ratio(ref_logp, logp, active).clamp(max=LOG_RATIO_CLAMP)  # (N, Tc)
    return (torch.expm1(d.double()) - d.double()).to(d.dtype)  # (N, Tc)


@torch.no_grad()
def importance_weights(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str, *, cap: float = 3.0, floor: float | None = None
) -> tuple[Tensor, Tensor]:
    """IS weights that correct for an external sampler (vLLM) whose log-probs differ from the trainer's.

    token modes: w[i, t] = exp(old - sampler); sequence modes: w_i = exp(sum_t m * (old - sampler)),
    the product of the token ratios, broadcast to (N, 1). *_truncate: clamp(w, floor, cap);
    *_mask: w * [floor <= w <= cap] (no lower bound when floor is None). The log-weight is clamped to
    +-LOG_RATIO_CLAMP before exp. A NaN log-prob (a sampler's, say) leaves w unknown: it is 0 in
    every mode (the token, or the row, drops out of the policy term) instead of a NaN loss whose
    gradient would ruin every weight; the raw w stays NaN (policy_loss counts it in is_clip_frac).

    Returns (corrected w, raw w), each (N, Tc) or (N, 1); no gradient.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"is_correction must be one of {IS_CORRECTIONS}, got {mode!r}")
    d = _masked_log_ratio(old_logp, sampler_logp, mask > 0)  # (N, Tc)
    if mode.startswith("sequence"):
        d = d.sum(1, keepdim=True)  # (N, 1)
    raw = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        return torch.where(raw.isnan(), 0.0, raw.clamp(min=floor, max=cap)), raw
    return torch.where(_within(raw, floor, cap), raw, 0.0), raw


def _within(w: Tensor, floor: float | None, cap: float) -> Tensor:
    """floor <= w <= cap (no floor when None); False for NaN."""
    return (w <= cap) & (w >= floor if floor is not None else True)


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
    num_micro_batches: micro-batches in the step, all ranks (bnpo only; a rank without rows has none).

    Under data parallelism every rank divides by the totals of ALL ranks, so the ranks' losses are
    shares that add up to the whole batch's loss, and the gradient reduction sums them.
    """

    loss_type: str
    num_sequences: int
    num_tokens: int
    max_completion_length: int
    num_micro_batches: int = 1

    def all_reduce(self, group: Any = None, device: torch.device | str | None = None) -> LossNormalizer:
        """Totals summed over the ranks of group (torch.distributed must be initialised).

        device: where the reduction tensor lives (a CUDA device for NCCL; CPU for gloo).
        """
        import torch.distributed as dist

        totals = [self.num_sequences, self.num_tokens, self.num_micro_batches]
        counts = torch.tensor(totals, dtype=torch.int64, device=device)
        length = torch.tensor([self.max_completion_length], dtype=torch.int64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
        return dataclasses.replace(
            self,
            num_sequences=int(counts[0]),
            num_tokens=int(counts[1]),
            num_micro_batches=int(counts[2]),
            max_completion_length=int(length[0]),
        )


def make_normalizer(
    mask: Tensor, loss_type: str = "dapo", *, max_completion_length: int | None = None, num_micro_batches: int = 1
) -> LossNormalizer:
    """Normalizer of one optimizer step from the (N, Tc) loss mask of the WHOLE step (this rank).

    max_completion_length defaults to Tc; give the configured maximum so dr_grpo's scale does not
    change with the padding of each batch. In the distributed case follow with .all_reduce().
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    assert mask.ndim == 2, f"mask must be (N, Tc), got {tuple(mask.shape)}"
    length = int(max_completion_length or mask.shape[1])
    tokens = int((mask > 0).sum())
    return LossNormalizer(loss_type, mask.shape[0], tokens, length, num_micro_batches=num_micro_batches)


# ----------------------------------------------------------------------------- policy loss


def _is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The policy-loss settings of a run, built once from the config and given to every policy_loss call.

    field                       config key                       meaning
    loss_type                   grpo.loss_type                   how token losses are summed and divided
    epsilon, epsilon_high       grpo.epsilon, grpo.epsilon_high  clip [1 - epsilon, 1 + epsilon_high]; None: epsilon
    delta                       grpo.delta                       two-sided clip: cap rho at delta (None: off)
    beta                        grpo.beta                        k3 KL weight; != 0 needs ref_logp
    importance_sampling_level   grpo.importance_sampling_level   "token" ratios or "sequence" (GSPO)
    is_correction               grpo.is_correction               sampler IS weights (None: off; needs sampler_logp)
    is_cap, is_min              grpo.is_cap, grpo.is_min         IS weight bounds (importance_weights' cap, floor)
    max_completion_length       sampler.max_new_tokens           dr_grpo's constant (None: the batch's Tc);
                                (env.max_episode_tokens with env)  an episode's row holds all its turns
    """

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    importance_sampling_level: Literal["token", "sequence"] = "token"
    is_correction: str | None = None
    is_cap: float = 3.0
    is_min: float | None = None
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.epsilon_high is None:  # frozen: the derived default is set once, here
            object.__setattr__(self, "epsilon_high", self.epsilon)
        for name in ("epsilon", "epsilon_high", "beta", "is_cap", *_OPTIONAL_NUMBERS):  # before any comparison
            value, optional = getattr(self, name), name in _OPTIONAL_NUMBERS
            if not (_is_number(value) or (optional and value is None)):
                raise ValueError(f"{name} must be a number{' or None' * optional}, got {value!r}")
        for name, allowed, ok in self._checks():
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def _checks(self) -> list[tuple[str, str, bool]]:
        """(field, allowed values, whether it holds): where the math is defined (the config is stricter)."""
        level, mode = self.importance_sampling_level, self.is_correction
        mcl, floor = self.max_completion_length, self.is_min
        whole = isinstance(mcl, numbers.Integral)
        return [
            ("loss_type", f"one of {LOSS_TYPES}", self.loss_type in LOSS_TYPES),
            ("importance_sampling_level", "'token' or 'sequence'", level in ("token", "sequence")),
            ("is_correction", f"one of {IS_CORRECTIONS}", mode is None or mode in IS_CORRECTIONS),
            ("epsilon", ">= 0", self.epsilon >= 0),
            ("epsilon_high", ">= 0", self.epsilon_high >= 0),
            ("delta", "> 0 or None", self.delta is None or self.delta > 0),
            ("beta", ">= 0 and finite", 0 <= self.beta < math.inf),  # inf * (k3 = 0) would make the loss NaN
            ("is_cap", "> 0", self.is_cap > 0),
            ("is_min", f"in [0, is_cap={self.is_cap}] or None", floor is None or 0 <= floor <= self.is_cap),
            ("max_completion_length", "a whole number >= 1 or None", mcl is None or (whole and mcl >= 1)),
        ]

    @classmethod
    def from_config(cls, cfg: Config) -> LossOptions:
        """The options of a run: cfg.grpo's loss settings and the longest completion row (a multi-turn
        episode's budget, else sampler.max_new_tokens)."""
        g = cfg.grpo
        longest, _ = completion_budget(cfg)
        same_name = [f.name for f in dataclasses.fields(cls) if f.name != "max_completion_length"]  # grpo.<name>
        return cls(**{name: getattr(g, name) for name in same_name}, max_completion_length=longest)


def is_tokenwise(opts: LossOptions, *, old_logp_given: bool) -> bool:
    """Whether d loss / d logp[i, t] depends on logp[i, t] alone (given the step's fixed inputs).

    True for token-level ratios with every loss type, clip setting, beta and token IS mode; then the
    gradient of a token is known as soon as its log-prob is (the fused LM head, update_loss.py).
    False for sequence-level ratios (GSPO) and for sequence IS weights without old_logp (both
    depend on the whole row's log-probs).
    """
    if opts.importance_sampling_level != "token":
        return False
    return old_logp_given or opts.is_correction is None or opts.is_correction.startswith("token")


def check_loss_inputs(
    mask: Tensor,
    opts: LossOptions,
    normalizer: LossNormalizer | None,
    *,
    ref_logp: Tensor | None,
    sampler_logp: Tensor | None,
) -> LossNormalizer:
    """Raise on inputs the options cannot use; return the normaliser (mask's own when None)."""
    if opts.beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    if opts.is_correction is not None and sampler_logp is None:
        raise ValueError(f"is_correction={opts.is_correction!r} needs sampler_logp")
    if normalizer is None:
        return make_normalizer(mask, opts.loss_type, max_completion_length=opts.max_completion_length)
    if normalizer.loss_type != opts.loss_type:
        raise ValueError(f"normalizer was made for {normalizer.loss_type!r}, not {opts.loss_type!r}")
    if opts.max_completion_length is not None and opts.max_completion_length != normalizer.max_completion_length:
        raise ValueError("max_completion_length conflicts with normalizer.max_completion_length")
    return normalizer


def policy_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor | None = None, level: str = "token") -> Tensor:
    """rho = exp(logp - old) per token, or with level "sequence" (GSPO) exp(mean over the row's
    active tokens) of shape (..., 1). Log-ratios are zeroed where mask is 0 (None: every token
    counts) and clamped to +-LOG_RATIO_CLAMP before exp."""
    m = torch.ones_like(logp, dtype=torch.float32) if mask is None else mask.to(torch.float32)
    log_ratio = _masked_log_ratio(logp, old_logp, m > 0)
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1))[..., None]
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def token_terms(
    ratio: Tensor,
    advantages: Tensor,
    opts: LossOptions,
    *,
    is_weight: Tensor | None = None,
    logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token (loss l, policy term pg, k3 KL or None) from the ratio; shapes broadcast together.

    pg = -min(rho' A, clamp(rho, 1 - epsilon, 1 + epsilon_high) A) * IS weight, rho' = min(rho, delta)
    with two-sided clipping; kl = k3(ref_logp, logp) when ref_logp is given (mask: padding gives 0);
    l = pg + beta * kl. Elementwise in logp when rho is the token ratio exp(logp - old).
    """
    clipped = ratio.clamp(1.0 - opts.epsilon, 1.0 + opts.epsilon_high)
    capped = ratio if opts.delta is None else ratio.clamp(max=opts.delta)
    pg = -torch.minimum(capped * advantages, clipped * advantages)
    if is_weight is not None:
        pg = pg * is_weight
    kl = None if ref_logp is None else kl_k3(logp, ref_logp, mask)
    loss = pg + opts.beta * kl if kl is not None and opts.beta != 0.0 else pg
    return loss, pg, kl


def token_weights(mask: Tensor, normalizer: LossNormalizer) -> Tensor:
    """(N, Tc) w with loss = sum(w * l): each token's share of the step's normalised loss (fp32; fp64
    for an fp64 mask).

    The aggregation of policy_loss (see there), written per token: the mask over the normaliser's
    totals (grpo also over the row's own length).
    """
    m = mask.to(_compute_dtype(mask))  # (N, Tc)
    n = normalizer
    if n.loss_type == "grpo":
        return m / m.sum(1, keepdim=True).clamp(min=1) / max(n.num_sequences, 1)
    if n.loss_type == "dr_grpo":
        return m / max(n.num_sequences * n.max_completion_length, 1)
    if n.loss_type == "dapo":
        return m / max(n.num_tokens, 1)
    return m / m.sum().clamp(min=1) / max(n.num_micro_batches, 1)  # bnpo


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    opts: LossOptions,
    *,
    normalizer: LossNormalizer | None = None,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate (+ k3 KL) of one micro-batch, normalised for gradient accumulation.

    Per token, with the settings of opts: l = -min(rho' * A, clamp(rho, 1 - epsilon, 1 + epsilon_high) * A),
    rho' = min(rho, delta) if delta is set (two-sided clipping) else rho; then l *= IS weight
    (is_correction); then l += beta * k3(ref, logp). Aggregation with S = sum(m * l) over this
    micro-batch and the totals of normalizer:
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
        opts: the loss settings (LossOptions.from_config(cfg)). The ratio rho is exp(logp - old) per
            token, or with importance_sampling_level "sequence" (GSPO)
            rho_i = exp(sum_t m (logp - old) / max(|o_i|, 1)), broadcast to the tokens.
        normalizer: the step's totals from make_normalizer(); None treats this micro-batch as the
            whole step (then opts.max_completion_length defaults to Tc).
        ref_logp: (N, Tc) reference log-probs; needed when beta != 0; if given, the KL is reported.
        sampler_logp: (N, Tc) the sampler's log-probs; needed with opts.is_correction.
        entropy: (N, Tc) optional per-token entropy, only reported.

    Returns:
        loss: 0-dim fp32 (fp64 when logp is fp64: no input is rounded to fp32).
        stats: detached 0-dim fp32 tensors of this micro-batch: pg_loss (per-token policy term after
            IS weighting, mean over active tokens), clip_low_frac (rho < 1-eps with A < 0),
            clip_high_frac (rho > 1+eps_high with A > 0), clip_region_frac (either), ratio_min,
            ratio_mean, ratio_max, active_tokens; kl (mean k3) if ref_logp is given; entropy if given.
            With is_correction: is_clip_frac (raw weight outside [is_min, is_cap], NaN counted) and over the
            tokens of known (not NaN) raw weight, before truncation or masking: is_weight_min, _mean, _max (absent
            if none is known) and is_weight_sum, is_weight_tokens_sum (merged micro-batches: mean = sum / tokens).
            Token statistics are 1 (ratios) or 0 on a micro-batch with no active token.
    """
    N, Tc = logp.shape
    assert mask.shape == (N, Tc), f"mask {tuple(mask.shape)} vs logp {(N, Tc)}"
    assert advantages.shape == (N,), f"advantages {tuple(advantages.shape)} vs N={N}"
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp)):
        assert t is None or t.shape == (N, Tc), f"{name} {tuple(t.shape)} vs logp {(N, Tc)}"
    assert entropy is None or entropy.shape == (N, Tc), f"entropy {tuple(entropy.shape)} vs {(N, Tc)}"
    o = opts
    normalizer = check_loss_inputs(mask, o, normalizer, ref_logp=ref_logp, sampler_logp=sampler_logp)

    dt = _compute_dtype(logp)  # fp32, or fp64 for fp64 log-probs (then every term is fp64)
    m = mask.to(dt)  # (N, Tc)
    active = m > 0  # (N, Tc)
    old = logp.detach() if old_logp is None else old_logp
    A = advantages.detach().to(dt)[:, None]  # (N, 1)

    ratio = policy_ratio(logp, old, m, o.importance_sampling_level)  # (N, Tc) or (N, 1)

    stats: dict[str, Tensor] = {}
    w = None
    if o.is_correction is not None:
        w, raw = importance_weights(old, sampler_logp, m, o.is_correction, cap=o.is_cap, floor=o.is_min)
        raw, known = raw.expand(N, Tc), active & ~raw.isnan()  # (N, Tc) each; a NaN weight counts as clipped
        stats |= _masked_min_mean_max("is_weight", raw, known) if known.any() else {}
        stats |= {"is_weight_sum": torch.where(known, raw, 0.0).sum(), "is_weight_tokens_sum": known.sum()}
        stats["is_clip_frac"] = _masked_mean((~_within(raw, o.is_min, o.is_cap)).float(), active)
    per_token, pg, kl = token_terms(ratio, A, o, is_weight=w, logp=logp, ref_logp=ref_logp, mask=m)
    per_token, pg = per_token.expand(N, Tc), pg.expand(N, Tc)  # (N, Tc)
    if kl is not None:
        stats["kl"] = _masked_mean(kl, active)
    loss = (per_token * token_weights(m, normalizer)).sum()

    # stats
    ratio_t = ratio.expand(N, Tc)
    low = (ratio_t < 1.0 - o.epsilon) & (A < 0)
    high = (ratio_t > 1.0 + o.epsilon_high) & (A > 0)
    stats["pg_loss"] = _masked_mean(pg, active)
    stats["clip_low_frac"] = _masked_mean(low.float(), active)
    stats["clip_high_frac"] = _masked_mean(high.float(), active)
    stats["clip_region_frac"] = _masked_mean((low | high).float(), active)
    stats |= _masked_min_mean_max("ratio", ratio_t, active)
    stats["active_tokens"] = m.sum()
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy.float(), active)
    return loss, {k: v.detach().double() for k, v in stats.items()}  # fp64: merged over micro-batches alike


def _masked_mean(x: Tensor, active: Tensor) -> Tensor:
    return torch.where(active, x, 0.0).sum() / active.sum().clamp(min=1)


def _masked_min_mean_max(prefix: str, x: Tensor, active: Tensor) -> dict[str, Tensor]:
    vals = x.detach().float()[active] if active.any() else x.new_ones(1, dtype=torch.float32)  # (n,): 1 for none
    return {f"{prefix}_min": vals.min(), f"{prefix}_mean": vals.mean(), f"{prefix}_max": vals.max()}


__all__ = [
    "IS_CORRECTIONS",
    "LOG_RATIO_CLAMP",
    "LOSS_TYPES",
    "LossNormalizer",
    "LossOptions",
    "check_loss_inputs",
    "group_advantages",
    "group_reward_stats",
    "group_rows",
    "importance_weights",
    "is_tokenwise",
    "kl_k3",
    "loss_mask",
    "make_normalizer",
    "policy_loss",
    "policy_ratio",
    "token_terms",
    "token_weights",
    "zero_spread_groups",
]
