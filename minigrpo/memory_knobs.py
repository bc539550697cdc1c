"""The single setting changes the memory pre-flight (memory.py) may name when a step does not fit.

    consider, out = single_changes(cfg, total, budget)     # total(config) -> predicted peak bytes
    consider("train.micro_batch_size", 4)                   # True (and recorded in `out`) if it fits
    combine(cfg, out, total, budget)                        # none fits alone: out.together, several at once

A change is named only when the config it makes fits by the same estimate AND loads: a value the
config's own rules refuse (a group size whose rows PPO's mini-batches no longer divide, say) would
send the user from one error to another, so it counts as not fitting and the search goes on. When
no single change fits, every change that loads is tried on the config built so far, those that keep
what a step computes first (sharding, checkpointing, smaller passes, fewer rows at once: keeps_computation),
a reward model's settings (rewards.<i>.kwargs.batch_size, dtype, device: memory_rewards.py) among them:
the first that lowers the peak further is kept and the search starts over (a change that did not lower
the starting peak may lower the one the step moved to), until the step fits: the refusal names that set, or says
that none fits.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

from minigrpo.config import Config
from minigrpo.memory_parts import dtype_bytes, kv_cache_bytes
from minigrpo.models.args import ModelArgs

Change = tuple[str, Any, Any, int]  # (key, old value, new value, predicted peak bytes)
# the settings that change how much memory a step holds, not what it computes (up to rounding): tried first
COMPUTATION_KEPT = (
    "distributed.",
    "sampler.vllm_sleep",
    "sampler.gpu_memory_utilization",
    "model.gradient_checkpointing",
    "model.activation_offload",
    "train.micro_batch_size",
    "sft.micro_batch_size",
    "sampler.max_rows",
    "sampler.merge_lora",
)


_REWARD_KWARG = re.compile(r"rewards\.(\d+)\.kwargs\.(\w+)")  # a reward's setting: rewards.<i>.kwargs.<name>


def with_setting(cfg: Config, key: str, value: Any) -> Config:
    """A copy of cfg with the one setting `key` ("section.name", or a reward's "rewards.<i>.kwargs.<name>")
    set to value."""
    c = copy.deepcopy(cfg)
    reward = _REWARD_KWARG.fullmatch(key)
    if reward is not None:
        c.rewards[int(reward[1])].kwargs[reward[2]] = value
        return c
    section, name = key.split(".")
    setattr(getattr(c, section), name, value)
    return c


def setting(cfg: Config, key: str) -> Any:
    """The value of the setting `key` (as with_setting names it) in cfg; a reward's setting that its kwargs
    leave out is its factory's default (reward_fns.REWARD_FACTORIES)."""
    reward = _REWARD_KWARG.fullmatch(key)
    if reward is None:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)
    from minigrpo.reward_fns import REWARD_FACTORIES

    entry, name = cfg.rewards[int(reward[1])], reward[2]
    factory = REWARD_FACTORIES.get(entry.name)
    parameter = inspect.signature(factory).parameters.get(name) if factory is not None else None
    return entry.kwargs.get(name, None if parameter is None else parameter.default)


def keeps_computation(key: str) -> bool:
    """Whether a change of `key` keeps what a step computes (COMPUTATION_KEPT, or fewer rows per reward
    model forward: the same scores)."""
    reward = _REWARD_KWARG.fullmatch(key)
    return key.startswith(COMPUTATION_KEPT) or (reward is not None and reward[2] == "batch_size")


def config_errors(cfg: Config, command: str = "train", world_size: int = 1) -> set[str]:
    """The lines config.validate would refuse `cfg` with (limits and cross-field rules) for `command`
    ("train" or "sft"), and those a `world_size`-rank launch adds; empty when it loads."""
    from minigrpo import configio
    from minigrpo.config_rules import cross_field_errors, distributed_errors, rules_of

    with rules_of(command):
        return set(configio.check_limits(cfg) + cross_field_errors(cfg, []) + distributed_errors(cfg, world_size))


class Changes(list):
    """The single changes that fit (Change tuples, in the order they were considered), and what a
    refusal that names none of them offers instead: `helpful`, every (key, value) considered that
    loads, fitting or not (with others it may lower a peak it does not lower alone); `together`, set
    by `combine` when none fits alone."""

    helpful: list[tuple[str, Any]]
    together: tuple[dict[str, Any], int] | None = None


def single_changes(
    cfg: Config, total: Callable[[Config], int], budget: int, command: str = "train", world_size: int = 1
) -> tuple[Callable[[str, Any], bool], Changes]:
    """(consider, out): consider(key, value) appends (key, old, value, predicted total) to `out` and
    returns True when that one change brings total(config) under budget and breaks none of the
    config's rules that `cfg` itself keeps (command, world_size: whose rules, as config_errors); every
    change that loads joins out.helpful."""
    out = Changes()
    out.helpful = []
    known = config_errors(cfg, command, world_size)  # a hand-built config's own faults are not the change's

    def consider(key: str, value: Any) -> bool:
        old = setting(cfg, key)
        if old == value:
            return False
        changed = with_setting(cfg, key, value)
        if config_errors(changed, command, world_size) - known:
            return False  # a config that does not load
        out.helpful.append((key, value))
        t = total(changed)
        if t <= budget:
            out.append((key, old, value, t))
        return t <= budget

    return consider, out


def combine(
    cfg: Config, out: Changes, total: Callable[[Config], int], budget: int, command: str = "train", world_size: int = 1
) -> Changes:
    """Set out.together when no single change fits: out.helpful tried one after another on the config
    built so far (COMPUTATION_KEPT first, then in the order considered: the least intrusive first): the
    first that lowers the peak further and keeps the config loading is kept, and the search starts over,
    until the peak fits or none helps: ({key: value} kept, predicted total). A total above budget means even
    all of them together do not fit. When single changes fit but each changes what a step computes (a
    shorter completion, fewer prompts), the COMPUTATION_KEPT ones are combined too, kept if they fit."""
    keeps = [change for change in out.helpful if keeps_computation(change[0])]
    if any(keeps_computation(key) for key, *_ in out):
        return out
    if out:  # the single changes all alter the step: name a set that does not, where one fits
        together = _combined(cfg, keeps, total, budget, command, world_size)
        out.together = together if together[0] and together[1] <= budget else None
        return out
    order = keeps + [change for change in out.helpful if change not in keeps]
    out.together = _combined(cfg, order, total, budget, command, world_size)
    return out


def _combined(
    cfg: Config, order: list, total: Callable[[Config], int], budget: int, command: str, world_size: int
) -> tuple[dict[str, Any], int]:
    """The changes of `order` kept one by one (see combine) and the predicted total with them."""
    known = config_errors(cfg, command, world_size)
    current, best, kept = cfg, total(cfg), {}
    while best > budget:  # each round keeps the first change in `order` that helps, then starts over
        for key, value in order:
            if kept.get(key, object()) == value:
                continue
            changed = with_setting(current, key, value)
            t = total(changed)
            if t < best and not config_errors(changed, command, world_size) - known:
                current, best, kept[key] = changed, t, value
                break
        else:  # none helps any more
            break
    return kept, best


def vllm_share_that_fits(
    cfg: Config,
    model_args: ModelArgs,
    prompt_tokens: int,
    budget: int,
    device_total: int,
    total: Callable[[Config], int],
) -> float | None:
    """The largest sampler.gpu_memory_utilization (a multiple of 0.05) below the configured one under
    which the step fits and vLLM still holds its weights and one whole sequence's KV cache (less and it
    refuses to start); when none fits, the smallest such share (it lowers the peak: a combination may
    use it); None if there is none below the configured one."""
    args, b = model_args, dtype_bytes(cfg, "cuda")
    need = args.num_params() * b + kv_cache_bytes(args, 1, prompt_tokens + cfg.sampler.max_new_tokens, b)
    share, smallest = math.floor(cfg.sampler.gpu_memory_utilization * 20 - 1e-9) / 20, None  # the next step down
    while share * device_total >= need and share > 0:
        if total(with_setting(cfg, "sampler.gpu_memory_utilization", share)) <= budget:
            return share
        share, smallest = round(share - 0.05, 2), share
    return smallest


def longest_that_fits(cfg: Config, key: str, lo: int, hi: int, total: Callable[[Config], int], budget: int) -> int:
    """The largest value of the integer setting `key` in [lo, hi) under which total fits in budget, found
    by bisection to within hi // 64; lo when none above it does (lo itself is not checked)."""
    step = max(1, hi // 64)
    while hi - lo > step:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(with_setting(cfg, key, mid)) <= budget else (lo, mid)
    return lo
