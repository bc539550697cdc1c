"""The `dpo:` section of the config: online DPO (`algorithm: online_dpo`, minigrpo/algorithms/online_dpo.py).

    algorithm: online_dpo
    grpo: {prompts_per_step: 16, group_size: 4}     # B prompts, G sampled completions each
    dpo: {beta: 0.1, loss: sigmoid, pairs: best_worst}

Online DPO reuses the GRPO rollout (grpo.prompts_per_step, grpo.group_size, grpo.dynamic_sampling,
the sampler and the reward functions) and grpo.num_iterations (optimizer steps per batch of
pairs); GRPO's policy-loss settings (loss_type, epsilon, delta, beta, is_correction,
mask_truncated_completions) do not apply, and a config that changes one is refused
(algorithms.unread_grpo_settings) rather than silently ignored.
Kept apart from config.py so the schema file stays readable; `Config.dpo` is `DPOCfg`. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from minigrpo.algorithms.ppo_config import unread_is_correction
from minigrpo.configio import Section, spec


@dataclass
class DPOCfg(Section):
    """The DPO objective on pairs ranked by the reward functions, against the reference policy."""

    beta: float = spec(0.1, "> 0")  # strength of the reference: implicit reward beta * log(pi / pi_ref)
    # sigmoid: -log sigmoid(beta * h) (Rafailov et al. 2023); ipo: (h - 1 / (2 beta))^2 (Azar et al. 2023),
    # h = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected), sequence log-probs
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # best_worst: one pair per group, its best against its worst completion; all: every two
    # completions of a group whose rewards differ (G(G-1)/2 pairs at most)
    pairs: Literal["best_worst", "all"] = "best_worst"
    # sigmoid only: the share of preference labels taken as flipped (conservative DPO); 0 = off
    label_smoothing: float = spec(0.0, "in [0, 0.5)")


def rows_per_group(cfg: Any) -> int:
    """Completions of one group that train together in a pass: 2 (best_worst) or all G (all)."""
    return 2 if cfg.dpo.pairs == "best_worst" else cfg.grpo.group_size


def dpo_errors(cfg: Any) -> list[str]:
    """Checks of the dpo section against the rest of the config (no import; the config is loading)."""
    dpo, errors = cfg.dpo, []
    if cfg.algorithm != "online_dpo":
        changed = [f"dpo.{k}={v!r}" for k, v in dpo.to_dict().items() if v != DPOCfg().to_dict()[k]]
        if changed:
            errors.append(f"{', '.join(changed)}: the dpo section is read only with algorithm: online_dpo")
        return errors
    if dpo.loss == "ipo" and dpo.label_smoothing:
        errors.append(f"dpo.label_smoothing ({dpo.label_smoothing}) applies to dpo.loss=sigmoid, not ipo")
    errors += unread_is_correction(cfg)
    if cfg.grpo.beta != 0:
        errors.append(
            f"grpo.beta ({cfg.grpo.beta}) is GRPO's KL weight; online DPO's pull towards the reference is "
            "dpo.beta: set grpo.beta=0"
        )
    need = rows_per_group(cfg)
    if cfg.train.micro_batch_size < need:
        errors.append(
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) must be >= {need} with dpo.pairs={dpo.pairs}: "
            f"a pass trains whole groups ({need} completions each) so that no pair is split"
        )
    return errors
