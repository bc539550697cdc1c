"""The `ppo:` section of the config: PPO with a learned critic (`algorithm: ppo`, minigrpo/algorithms/ppo.py).

    algorithm: ppo
    grpo: {prompts_per_step: 64, group_size: 1}     # B prompts, G completions each (1: no groups needed)
    ppo: {kl_coef: 0.05, epochs: 4, value_model: separate}

PPO reuses the GRPO rollout (grpo.prompts_per_step, grpo.group_size, the sampler, the reward
functions, env.*) and the optimizer settings (train.*; the critic has its own optimizer, at
ppo.value_lr). GRPO's objective settings (loss_type, epsilon, delta, beta, advantages,
num_iterations, dynamic sampling, is_correction, mask_truncated_completions) do not apply: PPO's
are here, and a config that changes one of them is refused rather than silently ignored.
Under torchrun every rank trains its share of the rows against the global mini-batches,
with the critic replicated (algorithms/ppo.py).
Kept apart from config.py so the schema file stays readable; `Config.ppo` is `PPOCfg`. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from minigrpo.configio import MAX_COUNT, Section, spec


@dataclass
class PPOCfg(Section):
    """Per-token rewards with a KL penalty, GAE, clipped policy and value losses, several epochs."""

    gamma: float = spec(1.0, "in [0, 1]")  # discount per completion token
    lam: float = spec(0.95, "in [0, 1]")  # GAE lambda: 0 = one-step TD, 1 = Monte Carlo returns
    # per-token penalty kl_coef * (log pi_old - log pi_ref) folded into the rewards; 0 = no reference pass
    kl_coef: float = spec(0.05, ">= 0")
    # policy ratio clipped to [1 - clip_eps, 1 + clip_eps]: a ratio is > 0, so a lower bound <= 0 never clips
    clip_eps: float = spec(0.2, "in (0, 1)")
    value_clip: float | None = spec(0.2, "> 0", why="null = no clipping")  # value change clip range
    # weight of the value loss. The critic has its own AdamW, which is blind to a constant factor on
    # its loss: vf_coef only decides where train.max_grad_norm clips the critic (value_lr sets its step)
    vf_coef: float = spec(0.1, "> 0")
    epochs: int = spec(4, ">= 1", most=MAX_COUNT)  # passes over each step's rollout
    mini_batches: int = spec(1, ">= 1", most=MAX_COUNT)  # optimizer steps per epoch (shuffled mini-batches of rows)
    # separate: a Transformer of its own; lora: a second set of adapters on the policy's frozen base
    value_model: Literal["separate", "lora"] = "separate"
    # separate: the critic's starting weights (a *ForSequenceClassification reward model, whose score
    # head starts the value head, or a causal LM); null: the policy's starting weights
    value_path: str | None = None
    value_lr: float | None = spec(None, ">= 0", why="null = train.lr")  # the critic's learning rate
    whiten_advantages: bool = True  # advantages to zero mean, unit variance over the step's tokens


def ppo_errors(cfg: Any) -> list[str]:
    """Checks of the ppo section against the rest of the config (no import; the config is loading)."""
    p, g, errors = cfg.ppo, cfg.grpo, []
    if cfg.algorithm != "ppo":
        default = PPOCfg().to_dict()
        changed = [f"ppo.{k}={v!r}" for k, v in p.to_dict().items() if v != default[k]]
        if changed:
            errors.append(f"{', '.join(changed)}: the ppo section is read only with algorithm: ppo")
        return errors
    if p.value_model == "lora" and not cfg.lora.enabled:
        errors.append(
            "ppo.value_model=lora puts the critic's adapters on the policy's base: it needs lora.enabled=true"
        )
    if p.value_model == "lora" and p.value_path is not None:
        errors.append(f"ppo.value_path={p.value_path!r} is read only with ppo.value_model=separate")
    if p.value_model == "separate" and p.value_path is None and cfg.lora.enabled and cfg.lora.quantize_base:
        errors.append(
            f"ppo.value_model=separate copies the policy's base and trains every weight, which an "
            f"{cfg.lora.quantize_base} base cannot do: use ppo.value_model=lora, or give ppo.value_path"
        )
    if p.value_path is not None and not p.value_path.strip():
        errors.append(
            f"ppo.value_path={p.value_path!r} is empty: give the critic's checkpoint folder or hub id, "
            "or null to start it from the policy's weights"
        )
    n = g.prompts_per_step * g.group_size
    per_row = cfg.sampler.max_new_tokens if cfg.env.kind is None else cfg.env.max_episode_tokens or 0
    if p.whiten_advantages and n * per_row == 1:
        errors.append(
            "ppo.whiten_advantages=true over a step of one token (one row, sampler.max_new_tokens=1) sets its "
            "advantage to 0 and the policy never learns: set ppo.whiten_advantages=false"
        )
    if p.mini_batches >= 1 and n % p.mini_batches:  # a count below 1 has its own error (its limit)
        errors.append(
            f"ppo.mini_batches ({p.mini_batches}) must divide the {n} rows of a step "
            f"(grpo.prompts_per_step * grpo.group_size): mini-batches are equal"
        )
    if g.beta != 0:
        errors.append(f"grpo.beta ({g.beta}) is GRPO's KL weight; PPO's KL penalty is ppo.kl_coef: set grpo.beta=0")
    if g.num_iterations != 1:
        errors.append(
            f"grpo.num_iterations ({g.num_iterations}) is GRPO's passes over a batch; PPO's are ppo.epochs: "
            "set grpo.num_iterations=1"
        )
    errors += unread_is_correction(cfg)
    if g.dynamic_sampling:
        errors.append(
            "grpo.dynamic_sampling drops groups whose rewards are all equal (no GRPO advantage); PPO's critic "
            "needs no spread within a group: set grpo.dynamic_sampling=false"
        )
    return errors


def unread_is_correction(cfg: Any) -> list[str]:
    """grpo.is_correction set by hand under online DPO or PPO, which read no sampler log-probs (their
    old and reference log-probs are the trainer's): one message, rather than a setting silently
    ignored. The value a vLLM sampler derives (token_truncate) passes."""
    mode = cfg.grpo.is_correction
    if mode is None or (cfg.sampler.kind == "vllm" and mode == "token_truncate"):
        return []
    return [
        f"grpo.is_correction={mode!r} weights GRPO's loss by the sampler's log-probs, which algorithm: "
        f"{cfg.algorithm} does not read (its log-probs are the trainer's): remove it"
    ]
