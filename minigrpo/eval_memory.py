"""Memory pre-flight of `python -m minigrpo.eval`: the peak device memory of an evaluation, predicted
before any weight loads, and the one line that refuses it when it cannot fit.

    est = estimate_eval_peak(cfg, model_args, prompt_tokens=300, batch_size=32, num_examples=500)
    eval_preflight(cfg, model_args, device, 300, batch_size=32, num_examples=500)   # MemoryPreflightError

Evaluation keeps no optimizer state, gradient or activation: its peak is the rollout of one batch,
B = min(--batch-size, examples) prompts x k = eval.samples_per_prompt completions, counted from the
parts of a training step's rollout (memory_parts.py; b the bytes of the model dtype):

    load      weights + fp32 LoRA adapters + one adapted weight merged in fp32   (a LoRA checkpoint only)
    rollout   weights (+ the adapters an NF4 base keeps) + KV cache + the larger of the prefill's
              and the decode step's transients (+ the reward models, loaded by an earlier batch)
    scoring   weights (+ the adapters an NF4 base keeps) + the reward models + their largest forward

The KV cache and transients are a training rollout's (memory_rollout.py, whose docstring gives the
formulas) with G = k and Tc = eval.max_new_tokens (with env.kind, turns of eval.max_new_tokens in
episodes of env.max_episode_tokens). The run's rewards score every batch: a `reward_model` reward on the
evaluated device loads at the first batch's scoring and stays (memory_rewards.py): its weights join every
later rollout (when there is a later batch) and the scoring phase, where the KV cache is gone and its
forward scores up to its batch_size of the B x k rows of Tp + Tc tokens.

The one line that refuses names the parts that dominate and each single change that would fit,
results-preserving ones first: a smaller --batch-size (an example's completion does not depend on
it), a smaller sampler.max_rows (the same tokens in more waves), fewer rows per reward model forward
(rewards.<i>.kwargs.batch_size), then bfloat16 reward model weights, a shorter eval.max_new_tokens or
fewer --samples-per-prompt (other results), and last a reward model on the CPU (slow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minigrpo.config import Config
from minigrpo.memory import MemoryPreflightError
from minigrpo.memory_knobs import with_setting
from minigrpo.memory_parts import (
    CUDA_WORKSPACES,
    GiB,
    MemoryEstimate,
    dtype_bytes,
    lora_adapter_shapes,
    lora_params,
    weight_bytes,
)
from minigrpo.memory_rewards import reward_model_bytes, reward_model_fixes
from minigrpo.memory_rollout import completion_slots, device_memory, rollout_bytes
from minigrpo.models.args import ModelArgs


def estimate_eval_peak(
    cfg: Config,
    model_args: ModelArgs,
    *,
    prompt_tokens: int,
    batch_size: int,
    num_examples: int | None = None,
    device_type: str = "cuda",
    adapter: bool = False,
    device_index: int | None = None,
) -> MemoryEstimate:
    """Predict the peak device memory of evaluating `cfg` on `model_args` (module docstring).

    prompt_tokens: the longest prompt in tokens (Tp); batch_size: --batch-size, the prompts generated
    at once (capped at num_examples when given); adapter: a LoRA checkpoint, whose shape cfg.lora
    holds (r, targets), loaded on the base and merged, with lora.enabled or not (an NF4 base, which
    lora.enabled with lora.quantize_base gives, keeps its adapters unmerged); device_index: the CUDA
    device evaluated on (None: the current one), whose reward models count."""
    args, b = model_args, dtype_bytes(cfg, device_type)
    k, Tp = cfg.eval.samples_per_prompt, prompt_tokens
    B = min(batch_size, num_examples) if num_examples else batch_size
    quantize = cfg.lora.quantize_base if adapter and cfg.lora.enabled else None  # LoRA off: the base as it is
    adapters = 4 * lora_params(args, cfg.lora.r, cfg.lora.targets) if adapter else 0  # lora.*: eval.take_adapter_shape
    parts = {"weights": weight_bytes(args, b, quantize), "lora_adapters": adapters if quantize else 0}
    parts["cuda_workspaces"] = CUDA_WORKSPACES if device_type == "cuda" else 0
    static = sum(parts.values())
    sampled = dict(new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature)
    own = rollout_bytes(cfg, args, prompts=B, group=k, prompt_len=Tp, b=b, **sampled)
    parts["kv_cache"], parts["rollout_transient"] = own.kv_cache, own.transient
    T = Tp + completion_slots(cfg, cfg.eval.max_new_tokens)  # the scored rows: prompt + completion (episode)
    rms = reward_model_bytes(cfg, device_type, B * k, T, device_index=device_index)
    later_batch = num_examples is None or num_examples > batch_size  # one batch: no rollout after a scoring
    parts["reward_models"], parts["reward_scoring"] = rms.weights, rms.scoring
    held = ("weights", "lora_adapters", "cuda_workspaces")
    rollout = static + parts["kv_cache"] + parts["rollout_transient"] + (rms.weights if later_batch else 0)
    phases = {"rollout": rollout}
    members = {"rollout": (*held, "kv_cache", "rollout_transient", *(("reward_models",) if later_batch else ()))}
    if rms.scoring:  # after the rollout: the KV cache lives only while a batch is generated
        phases["scoring"] = static + rms.weights + rms.scoring
        members["scoring"] = (*held, "reward_models", "reward_scoring")
    if adapter and not quantize and adapters:  # merged one weight at a time in fp32, then the adapters go
        parts["lora_adapters_to_merge"] = adapters
        parts["lora_merge"] = max(i * o for _, i, o in lora_adapter_shapes(args, cfg.lora.targets)) * 4
        phases["load"] = parts["weights"] + adapters + parts["lora_merge"] + parts["cuda_workspaces"]
        members["load"] = ("weights", "lora_adapters_to_merge", "lora_merge", "cuda_workspaces")
    return MemoryEstimate(parts=parts, phases=phases, members=members, notes=rms.notes)


def eval_preflight(
    cfg: Config,
    model_args: ModelArgs,
    device: torch.device | str,
    prompt_tokens: int,
    *,
    batch_size: int,
    num_examples: int | None = None,
    adapter: bool = False,
    free_bytes: int | None = None,
    margin: float = 0.05,
) -> MemoryEstimate:
    """Return the estimate when it fits in the device's free memory less `margin` (free_bytes: default
    torch.cuda.mem_get_info plus what torch reserves in this process; on CPU nothing is checked), else
    raise MemoryPreflightError: one line naming the largest parts and the single changes that fit."""
    device = torch.device(device)
    if device.type == "cuda" and free_bytes is None:
        free_bytes = device_memory(device)[0]
    kw = dict(prompt_tokens=prompt_tokens, num_examples=num_examples, device_type=device.type, adapter=adapter)
    kw["device_index"] = device.index
    est = estimate_eval_peak(cfg, model_args, batch_size=batch_size, **kw)
    if free_bytes is None:
        return est
    budget = int(free_bytes * (1 - margin))
    if est.total <= budget:
        return est

    def total(c: Config, size: int) -> int:
        return estimate_eval_peak(c, model_args, batch_size=size, **kw).total

    B = min(batch_size, num_examples) if num_examples else batch_size
    found = eval_fixes(cfg, B, total, budget, device.type, device.index)
    largest = ", ".join(f"{name} {v / GiB:.1f} GiB" for name, v in est.largest_parts(count=3))
    head = (
        f"evaluation is predicted to need {est.total / GiB:.1f} GiB at its peak ({est.peak_phase}: {largest}) "
        f"but {device} has {free_bytes / GiB:.1f} GiB free ({budget / GiB:.1f} GiB usable with a {margin:.0%} margin)"
    )
    if not found:
        length = "eval.max_new_tokens" if cfg.env.kind is None else "env.max_episode_tokens"
        held = est.parts["reward_models"]
        scorers = "the reward models' rewards.<i>.kwargs.batch_size, dtype or device, " if held else ""
        raise MemoryPreflightError(
            f"{head}: no single setting fits; combine a smaller --batch-size, sampler.max_rows, {scorers}"
            f"{length} and --samples-per-prompt, or evaluate a LoRA run on an NF4 base (lora.quantize_base)"
        )
    fixes = ", or ".join(f"{flag} ({t / GiB:.1f} GiB)" for flag, t in found)
    raise MemoryPreflightError(f"{head}: pass {fixes}")


def eval_fixes(
    cfg: Config,
    batch: int,
    total: Callable[[Config, int], int],
    budget: int,
    device_type: str = "cuda",
    device_index: int | None = None,
) -> list[tuple[str, int]]:
    """(argument to pass, predicted peak) of each single change that fits `budget`, the ones that keep
    the results first: the largest --batch-size below `batch`, the largest sampler.max_rows (halving),
    fewer rows per reward model forward; then bfloat16 reward model weights, the longest eval.max_new_tokens
    (env.max_episode_tokens in episodes), the most --samples-per-prompt, and a reward model on the CPU
    (those on device_type / device_index count)."""
    out: list[tuple[str, int]] = []

    def reward_models(keys: tuple[str, ...]) -> None:
        """The reward models' settings that fit (memory_rewards.reward_model_fixes), as --set arguments."""
        found: list = []
        reward_model_fixes(cfg, lambda c: total(c, batch), budget, found, device_type, device_index, keys)
        out.extend((f"--set {key}={value}", t) for key, _, value, t in found)

    def consider(key: str, lo: int, hi: int, shown: str) -> None:
        """The largest value of `key` in [lo, hi] that fits, recorded as `shown` with it."""
        value = _largest(lo, hi, lambda v: peak(key, v) <= budget)
        if value:
            out.append((f"{shown}{value}", peak(key, value)))

    def peak(key: str, value: int) -> int:
        return total(cfg, value) if key == "batch_size" else total(with_setting(cfg, key, value), batch)

    consider("batch_size", 1, batch - 1, "--batch-size ")
    k = cfg.eval.samples_per_prompt
    rows = min(cfg.sampler.max_rows or batch * k, batch * k) // 2
    while rows >= 1 and peak("sampler.max_rows", rows) > budget:  # halving: waves of whole groups stay whole
        rows //= 2
    if rows >= 1:
        out.append((f"--set {own_sampler_prefix(cfg)}sampler.max_rows={rows}", peak("sampler.max_rows", rows)))
    reward_models(("batch_size", "dtype"))
    if cfg.env.kind is None:
        consider("eval.max_new_tokens", 1, cfg.eval.max_new_tokens - 1, "--set eval.max_new_tokens=")
    else:  # the episode length sizes the cache; it may not go below a turn's sampler.max_new_tokens
        budget_key, low = "env.max_episode_tokens", cfg.sampler.max_new_tokens
        consider(budget_key, low, cfg.env.max_episode_tokens - 1, f"--set {budget_key}=")
    consider("eval.samples_per_prompt", 1, k - 1, "--samples-per-prompt ")
    reward_models(("device",))  # on the CPU: the same scores, slowly
    return out


def own_sampler_prefix(cfg: Config) -> str:
    """What a --set of sampler.max_rows needs before it: nothing with the own sampler, which evaluation
    always runs; `sampler.kind=own ` on a vLLM run's config, which refuses sampler.max_rows otherwise."""
    return "" if cfg.sampler.kind == "own" else "sampler.kind=own "


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest value in [lo, hi] for which `fits` holds (fits is monotone: true up to a point), 0 if none."""
    best = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best
