"""DPO math: preference pairs from each group's rewards, and the DPO / IPO loss on sequence log-probs.

Pure tensor functions (torch only, no model code), checked in tests/test_online_dpo.py against fp64
references written from the papers. The update that uses them is algorithms/online_dpo.py.

Shapes: N rows in groups of G contiguous rows (the completions of one prompt), P pairs.

Pairs, per group, from the reward totals r (NaN: not scored)
    best_worst  the first row of the highest reward against the first of the lowest: one pair
    all         every two rows i < j whose rewards differ, the higher one chosen: G(G-1)/2 at most
A candidate pair the rewards do not rank is skipped and counted in `ties`: equal rewards or a NaN
reward (best_worst: a group whose scored rows all tie, or that has fewer than two of them).

The loss of a pair (chosen c, rejected r), with sequence log-probs (the sum over the completion's
own tokens) under the policy (logp, with grad) and the reference (ref, none):
    h        = (logp_c - ref_c) - (logp_r - ref_r)
    sigmoid  l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     Rafailov et al. 2023 (DPO),
                                                         eps = label smoothing (Mitchell 2023, cDPO)
    ipo      l = (h - 1 / (2 beta))^2                   Azar et al. 2023 (IPO; beta is their tau)
    loss     = sum of l over the pairs given / num_pairs, the step's pair count: the losses of any
               split of the pairs into micro-batches add up to the mean over the step
The implicit reward of a completion is beta * (logp - ref); `accuracy` is the share of pairs whose
chosen completion has the higher implicit reward, `margin` the mean of beta * h.

Worked example (beta = 0.5, one pair): logp_c = -1, ref_c = -2, logp_r = -3, ref_r = -2.5
    h = (-1 + 2) - (-3 + 2.5) = 1.5;  sigmoid: l = -log sigmoid(0.75) = 0.38687;  ipo: (1.5 - 1)^2 = 0.25
    implicit rewards 0.5 and -0.25: accuracy 1, margin 0.75
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PAIRINGS = ("best_worst", "all")
LOSSES = ("sigmoid", "ipo")


def preference_pairs(rewards: Tensor, group_size: int, pairs: str = "best_worst") -> tuple[Tensor, Tensor, int]:
    """Preference pairs within each group of `group_size` rows (see the module docstring).

    Args:
        rewards: (N,) reward totals, NaN where nothing was scored; N a multiple of group_size.
        pairs: "best_worst" or "all".
    Returns (chosen (P,) long, rejected (P,) long, ties): row indices into `rewards`, group by
    group in row order, and the candidate pairs skipped because the rewards do not rank them.
    """
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs must be one of {PAIRINGS}, got {pairs!r}")
    N = rewards.shape[0]
    assert rewards.ndim == 1 and N % group_size == 0, f"rewards {tuple(rewards.shape)} vs G={group_size}"
    r = rewards.detach().double().cpu().tolist()
    chosen: list[int] = []
    rejected: list[int] = []
    ties = 0
    for start in range(0, N, group_size):
        rows = range(start, start + group_size)
        if pairs == "best_worst":
            scored = [i for i in rows if not math.isnan(r[i])]
            best = max(scored, key=lambda i: r[i], default=None)  # the first of equals
            worst = min(scored, key=lambda i: r[i], default=None)
            if best is None or r[best] == r[worst]:
                ties += 1
            else:
                chosen.append(best)
                rejected.append(worst)
            continue
        for i in rows:
            for j in range(i + 1, start + group_size):
                if r[i] == r[j] or math.isnan(r[i]) or math.isnan(r[j]):
                    ties += 1
                else:
                    chosen.append(i if r[i] > r[j] else j)
                    rejected.append(j if r[i] > r[j] else i)
    as_long = {"dtype": torch.long}
    return torch.tensor(chosen, **as_long), torch.tensor(rejected, **as_long), ties


def sequence_logprobs(logp: Tensor, mask: Tensor) -> Tensor:
    """(N,) log-probability of each completion: the sum of its (N, Tc) token log-probs over `mask`
    (the model's own tokens), summed in at least fp32 (fp64 stays fp64). Padding is left out with
    where, so -inf or garbage there cannot leak."""
    assert logp.shape == mask.shape, f"logp {tuple(logp.shape)} vs mask {tuple(mask.shape)}"
    return torch.where(mask > 0, logp.to(torch.promote_types(logp.dtype, torch.float32)), 0.0).sum(-1)


def dpo_loss(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    num_pairs: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO (or IPO) loss of P pairs, divided by the step's pair count (module docstring).

    Args:
        logp_chosen, logp_rejected: (P,) sequence log-probs under the policy (with grad).
        ref_chosen, ref_rejected: (P,) sequence log-probs under the reference (no grad needed).
        beta: > 0. loss: "sigmoid" or "ipo". label_smoothing: in [0, 0.5), sigmoid only.
        num_pairs: the pairs of the whole optimizer step (None: these P).
    Returns:
        loss: 0-dim, in the dtype of the log-probs (at least fp32); 0 (with a graph) when P = 0.
        stats: detached 0-dim means over these P pairs (0 when P = 0): accuracy, margin,
            logp_chosen, logp_rejected, reward_chosen, reward_rejected (implicit rewards).
    """
    P = logp_chosen.shape[0]
    for name, t in (("logp_rejected", logp_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        assert t.shape == (P,), f"{name} {tuple(t.shape)} vs logp_chosen {(P,)}"
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss != "sigmoid"):
        raise ValueError(f"label_smoothing={label_smoothing} needs loss='sigmoid' and a value in [0, 0.5)")
    dtype = torch.promote_types(logp_chosen.dtype, torch.float32)
    chosen_ratio = logp_chosen.to(dtype) - ref_chosen.detach().to(dtype)  # (P,) log pi / pi_ref
    rejected_ratio = logp_rejected.to(dtype) - ref_rejected.detach().to(dtype)  # (P,)
    h = chosen_ratio - rejected_ratio  # (P,)
    if loss == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        per_pair = (h - 1 / (2 * beta)) ** 2
    total = per_pair.sum() / max(P if num_pairs is None else num_pairs, 1)

    def mean(x: Tensor) -> Tensor:
        return x.detach().float().mean() if P else x.new_zeros((), dtype=torch.float32)

    reward_chosen, reward_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {
        "accuracy": mean((reward_chosen > reward_rejected).float()),
        "margin": mean(reward_chosen - reward_rejected),
        "logp_chosen": mean(logp_chosen),
        "logp_rejected": mean(logp_rejected),
        "reward_chosen": mean(reward_chosen),
        "reward_rejected": mean(reward_rejected),
    }
    return total, stats


__all__ = ["LOSSES", "PAIRINGS", "dpo_loss", "preference_pairs", "sequence_logprobs"]
