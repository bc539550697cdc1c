"""The training algorithms (`algorithm:` in the config): variants of the one loop in minigrpo/train.py.

    grpo        minigrpo/step.py: logprobs_phase, reference_logprobs, update_phase (train.loop calls
                them itself: GRPO is the loop's own path)
    online_dpo  minigrpo/algorithms/online_dpo.py: per group, completions ranked by their rewards
                become preference pairs, trained with the DPO (or IPO) loss against the reference
    ppo         minigrpo/algorithms/ppo.py: a learned critic (algorithms/value_model.py), per-token
                rewards with a KL penalty, GAE, clipped policy and value losses over several epochs

Every algorithm shares the loop's other phases: the rollout (B prompts x G completions on the live
weights, scored by the reward functions: step.rollout_phase), the sampler sync and the bookkeeping
(metrics, checkpoints, --resume). What differs is what happens between the scored batch and the
weights of the next step; an algorithm other than GRPO is one function, listed in UPDATES:

    update(run, batch) -> dict[str, float]   # its log-prob passes and optimizer step(s); the metrics

It is called in train.loop where GRPO calls update_phase. An algorithm also has its config checks
(`config_errors`, at load time) and may need the reference policy built (`needs_reference`: a
frozen copy for full fine-tuning, the adapters switched off with LoRA; build.build_run makes it and
the memory pre-flight counts it).

This package's top level imports no torch (config.py reads it); the updates are imported when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from minigrpo.algorithms.dpo_config import dpo_errors
from minigrpo.algorithms.ppo_config import ppo_errors

ALGORITHMS = ("grpo", "online_dpo", "ppo")  # the values of `algorithm:` (config.Config.algorithm)

# algorithm -> "module:function" of its update (GRPO is the loop's own path, not listed)
UPDATES = {
    "online_dpo": "minigrpo.algorithms.online_dpo:update",
    "ppo": "minigrpo.algorithms.ppo:update",
}


# GRPO's objective settings, read by its policy loss only: online DPO and PPO share the rollout
# settings of the grpo section, never these (their own are in the dpo and ppo sections)
GRPO_OBJECTIVE = (
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "scale_rewards",
    "advantage_estimator",
    "mask_truncated_completions",
    "is_cap",  # the bounds of grpo.is_correction's weights, which weight GRPO's loss alone
    "is_min",
)


def config_errors(cfg: Any) -> list[str]:
    """The algorithm's checks between fields (one message each), while the config loads."""
    return dpo_errors(cfg) + ppo_errors(cfg) + unread_grpo_settings(cfg)


def unread_grpo_settings(cfg: Any) -> list[str]:
    """One message naming the GRPO objective settings changed from their defaults under another
    algorithm, which would otherwise be ignored without a word (grpo.epsilon is not PPO's clip)."""
    if cfg.algorithm == "grpo":
        return []
    default = type(cfg.grpo)()
    changed = [
        f"grpo.{key}={getattr(cfg.grpo, key)!r}"
        for key in GRPO_OBJECTIVE
        if getattr(cfg.grpo, key) != getattr(default, key)
        and not (key == "epsilon_high" and cfg.grpo.epsilon_high == cfg.grpo.epsilon)  # derived from epsilon
    ]
    if not changed:
        return []
    section = "dpo" if cfg.algorithm == "online_dpo" else "ppo"
    return [
        f"{', '.join(changed)}: GRPO's objective settings are not read with algorithm: {cfg.algorithm} "
        f"(its own are in the {section} section): remove them"
    ]


def needs_reference(cfg: Any) -> bool:
    """Whether the run computes log-probs under the reference policy: GRPO with a KL term
    (grpo.beta > 0), online DPO always (its implicit reward is beta * log(pi / pi_ref)), PPO with a
    KL penalty (ppo.kl_coef > 0)."""
    if cfg.algorithm == "online_dpo":
        return True
    if cfg.algorithm == "ppo":
        return cfg.ppo.kl_coef > 0
    return cfg.grpo.beta > 0


def updates_per_step(cfg: Any) -> int:
    """Optimizer steps per training step (the schedule's unit): grpo.num_iterations, or PPO's
    ppo.epochs x ppo.mini_batches."""
    if cfg.algorithm == "ppo":
        return cfg.ppo.epochs * cfg.ppo.mini_batches
    return cfg.grpo.num_iterations


def update_fn(algorithm: str) -> Callable[..., dict[str, float]]:
    """The update of an algorithm other than GRPO: `update(run, batch) -> metrics`."""
    module, _, name = UPDATES[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ALGORITHMS",
    "GRPO_OBJECTIVE",
    "UPDATES",
    "config_errors",
    "needs_reference",
    "update_fn",
    "updates_per_step",
]
