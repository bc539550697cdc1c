"""Memory pre-flight: the peak device memory of one GRPO (or SFT) step, predicted before step 1.

    est = estimate_peak(cfg, model.args, prompt_tokens=512)     # MemoryEstimate: parts, phases, total
    print(est.table())
    preflight(cfg, model.args, device, prompt_tokens=512)       # raises MemoryPreflightError if it cannot fit

A step has four phases (five with a reward model) whose peaks never overlap (each frees its working
memory before the next):

    rollout     weights + optimizer state + KV cache B x Tp + N x Tc + prefill or decode transient
                (+ LoRA's merged copy of the adapted weights, sampler.merge_lora)
    scoring     weights + optimizer state + a reward model's scoring forward (only with one on the device)
    logprobs    weights + optimizer state + one micro-batch forward without autograd  (old / ref passes)
    update      weights + optimizer state + gradients + one micro-batch's activations at their peak
    optimizer   weights + optimizer state + gradients + the optimizer's own temporaries

With `algorithm: ppo` the critic's weights, masters and optimizer state are static too; its gradients join the
policy's in the update phase and the policy's optimizer step (the critic steps after it, the policy's gradients freed).

The bytes of each part (weights, adapters, optimizer state, activations) are counted in
memory_parts.py, the own sampler's KV cache and rollout transients in memory_rollout.py (shared with
evaluation's pre-flight, eval_memory.py), each docstring giving the formulas; here they are added
up per phase, compared with the device, and turned into a list of single setting changes that would
fit (memory_knobs.py: each also passes the config's own rules). A `reward_model` reward's weights are
held all along and its scoring forward has its phase (memory_rewards.py). Under QLoRA every pass of the
model also holds one dequantized weight at a time.

An SFT step (python -m minigrpo.sft: estimate_sft_peak, sft_preflight) has the update and optimizer
phases only, its LM head the fused cross-entropy over every position of a micro-batch. The estimate
is of memory *allocated* by torch; the caching allocator reserves more (fragmentation): a margin.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from minigrpo.algorithms import needs_reference
from minigrpo.algorithms.dpo_config import rows_per_group
from minigrpo.config import Config
from minigrpo.errors import UserError
from minigrpo.memory_estimate import format_bytes
from minigrpo.memory_knobs import (
    Changes,
    combine,
    longest_that_fits,
    single_changes,
    vllm_share_that_fits,
    with_setting,
)
from minigrpo.memory_parts import (
    ACTIVATION_PARTS,
    CUDA_WORKSPACES,
    GiB,
    MemoryEstimate,
    activation_parts,
    dequantized_weight_bytes,
    dtype_bytes,
    lora_adapter_shapes,
    micro_batch_activations,
    nograd_forward_bytes,
    optimizer_notes,
    step_transient_bytes,
    trainer_bytes,
    update_bytes,
    value_model_bytes,
    vllm_share,
)
from minigrpo.memory_ranks import all_reduce_bytes, fsdp_gathered, fsdp_static, rank_prompts
from minigrpo.memory_rewards import reward_model_bytes, reward_model_fixes
from minigrpo.memory_rollout import completion_slots, rollout_bytes
from minigrpo.memory_rollout import device_memory as _device_memory  # by this name, so tests can replace it
from minigrpo.models.args import ModelArgs

_CRITIC = ("weights", "gradients", "masters", "optimizer", "numel")  # value_model_bytes' keys (PPO's critic)


class MemoryPreflightError(UserError, RuntimeError):
    """The configured step does not fit in the device's free memory."""


# ================================================================================================
# the whole step


def estimate_peak(
    cfg: Config,
    model_args: ModelArgs,
    *,
    prompt_tokens: int,
    device_type: str = "cuda",
    device_total: int | None = None,
    world_size: int = 1,
    device_index: int | None = None,
) -> MemoryEstimate:
    """Predict the peak device memory of one training step of `cfg` on `model_args` (on each rank of
    a `world_size`-process job: memory_ranks.py says what the strategy changes).

    prompt_tokens: the longest prompt in tokens (Tp); completions are taken at sampler.max_new_tokens
        (with env.kind: whole episodes at env.max_episode_tokens).
    device_type: "cuda" (Triton kernels) or "cpu" (reference kernels, fp32 norm copies).
    device_total: the device's total bytes; needed only to count a colocated vLLM sampler.
    device_index: the CUDA device's index (None: the current one), which reward models on it count for.
    """
    args, lora, tr, g = model_args, cfg.lora, cfg.train, cfg.grpo
    b = dtype_bytes(cfg, device_type)
    Tp, Tc = prompt_tokens, completion_slots(cfg, cfg.sampler.max_new_tokens)  # env.kind: a whole episode
    T, B, G = Tp + Tc, rank_prompts(g.prompts_per_step, world_size), g.group_size
    strategy = cfg.distributed.resolved_strategy(lora.enabled) if world_size > 1 else None
    N, mb = B * G, min(tr.micro_batch_size, B * G)
    parts: dict[str, int] = {}
    notes: list[str] = []

    # ---- static: weights, adapters, masters, optimizer state
    quantize = lora.quantize_base if lora.enabled else None
    parts.update(trainer_bytes(args, cfg, b))
    parts["reference_model"] = parts["weights"] if needs_reference(cfg) and not lora.enabled else 0
    gathered = dict.fromkeys(("sampling", "forward", "backward"), 0)
    if strategy == "fsdp":  # fp32 shards (the masters), their gradients and state; units gathered in use
        parts.update(fsdp_static(args, cfg, world_size, needs_reference(cfg) and not lora.enabled))
        gathered = fsdp_gathered(args, cfg, b)
    grad_bytes, n_train, masters = parts.pop("gradients"), parts.pop("numel"), parts["master_weights"]
    notes += optimizer_notes(cfg)
    parts["cuda_workspaces"] = CUDA_WORKSPACES if device_type == "cuda" else 0
    critic = value_model_bytes(args, cfg, b) if cfg.algorithm == "ppo" else dict.fromkeys(_CRITIC, 0)
    parts["value_model"], parts["value_master_weights"] = critic["weights"], critic["masters"]
    parts["value_optimizer_state"] = critic["optimizer"]
    if cfg.algorithm == "ppo" and cfg.ppo.value_path is not None:
        notes.append("the critic from ppo.value_path is counted with the policy's architecture")
    vllm = vllm_share(cfg, device_total) if cfg.sampler.kind == "vllm" else 0
    if cfg.sampler.kind == "vllm" and not device_total:
        notes.append("vLLM's share (sampler.gpu_memory_utilization x device memory) is not counted")
    awake = cfg.sampler.kind == "vllm" and not (cfg.sampler.vllm_sleep and device_type == "cuda")
    if awake:  # vLLM keeps its share while the trainer runs: every phase holds it
        parts["vllm"] = vllm
    rms = reward_model_bytes(cfg, device_type, N, T, device_index=device_index, world_size=world_size)
    parts["reward_models"], notes = rms.weights, notes + rms.notes  # loaded at the first scoring, kept all run
    static, held = sum(parts.values()), tuple(parts)

    # ---- rollout: KV cache + prefill / decode transients (memory_rollout.py)
    parts["gathered_for_sampling"] = gathered["sampling"]  # FSDP: decoding (or a vLLM sync) on whole weights
    if cfg.sampler.kind == "vllm":
        parts["kv_cache"] = 0
        parts["vllm"] = vllm
        rollout = static + (0 if awake else vllm) + gathered["sampling"]
    else:
        sampled = dict(new_tokens=cfg.sampler.max_new_tokens, temperature=cfg.sampler.temperature)
        own = rollout_bytes(cfg, args, prompts=B, group=G, prompt_len=Tp, b=b, **sampled)
        parts["kv_cache"], parts["rollout_transient"] = own.kv_cache, own.transient
        if lora.enabled and quantize is None and b < 4 and cfg.sampler.merge_lora:  # adapters_frozen(merge=True)
            shapes = lora_adapter_shapes(args, lora.targets)  # a copy of each adapted weight (and bias)
            biased = {"qkv": args.qkv_bias, "o": args.o_bias, "gate_up": args.mlp_bias, "down": args.mlp_bias}
            copies = sum(i * o + (o if biased[group] else 0) for group, i, o in shapes)
            largest = max(i * o for _, i, o in shapes)  # merged in fp32 one layer at a time
            parts["lora_merged_for_sampling"] = copies * args.n_layers * b + largest * 4
        rollout = static + parts["kv_cache"] + parts["rollout_transient"] + parts.get("lora_merged_for_sampling", 0)
        rollout += gathered["sampling"]
    parts["dequantized_weight"] = dequant = dequantized_weight_bytes(args, cfg, b)  # rollout / a vLLM sync too
    rollout += dequant
    # ---- scoring: after the sampler's cache is freed; vLLM still awake, FSDP's weights still gathered
    parts["reward_scoring"] = rms.scoring
    scoring = static + (vllm if cfg.sampler.kind == "vllm" and not awake else 0) + gathered["sampling"] + rms.scoring

    # ---- old / reference log-prob passes: a forward without autograd per micro-batch
    need_logprobs = g.num_iterations > 1 or needs_reference(cfg) or g.is_correction is not None
    need_logprobs = need_logprobs or cfg.algorithm == "ppo"  # old log-probs and the critic's old values
    nograd = nograd_forward_bytes(args, mb, T, Tc, b, device_type)
    parts["logprob_forward"] = nograd if need_logprobs else 0
    parts["gathered_units"] = gathered["forward"]  # FSDP: the root and the blocks in flight
    logprobs = static + nograd + gathered["forward"] + dequant if need_logprobs else 0

    # ---- update: gradients + one micro-batch's activations
    act = micro_batch_activations(cfg, args, mb, T, Tc, b, device_type)
    parts["gradients"] = grad_bytes
    parts["value_gradients"] = critic["gradients"]  # PPO: the policy's pass, then the critic's (no larger)
    one = math.ceil(N / (cfg.ppo.mini_batches if cfg.algorithm == "ppo" else 1)) <= mb  # a step's only micro-batch
    head_grad = 0 if lora.enabled or strategy == "fsdp" else args.vocab_size * args.dim * b  # FSDP: in gathered
    head = dict(head_grad=head_grad, layers=args.n_layers)
    update = static + update_bytes(act, grad_bytes, critic["gradients"], accumulating=not one, **head)
    parts["unsharded_gradients"] = gathered["backward"]  # FSDP: before each reduce-scatter
    update += gathered["forward"] + gathered["backward"] + dequant
    grad_bytes += critic["gradients"]
    parts.update(activation_parts(act))

    # ---- optimizer step: fp32 copies of 16-bit grads (MasterWeights, a bucket at a time, each 16-bit
    # grad freed as its copy is made) + AdamW's foreach temporaries; the largest tensor is the embedding
    largest = args.vocab_size * args.dim
    step_tmp = step_transient_bytes(n_train, masters > 0, tr.optimizer, largest, grad_b=b)
    critic_tmp = step_transient_bytes(critic["numel"], critic["masters"] > 0, tr.optimizer, largest, grad_b=b)
    critic_step = critic["gradients"] + critic_tmp  # PPO: after the policy's step, which freed its gradients
    critic_peak = critic_step > grad_bytes + step_tmp  # (grad_bytes: both models'; the critic's wait)
    parts["optimizer_step_transient"] = critic_tmp if critic_peak else step_tmp
    optimizer = static + max(grad_bytes + step_tmp, critic_step)

    host = {"activation_offload": act["offload_host"]} if act["offload_host"] else {}
    phases = {"rollout": rollout, **({"scoring": scoring} if rms.scoring else {}), "logprobs": logprobs}
    phases.update(update=update, optimizer=optimizer)
    grads = ("gradients", "value_gradients")
    sampling = ("vllm", "kv_cache", "rollout_transient", "lora_merged_for_sampling", "gathered_for_sampling")
    members = {
        "rollout": (*held, *sampling, "dequantized_weight"),
        "scoring": (*held, "vllm", "gathered_for_sampling", "reward_scoring"),
        "logprobs": (*held, "logprob_forward", "gathered_units", "dequantized_weight"),
        "update": (*held, *grads, *ACTIVATION_PARTS, "gathered_units", "unsharded_gradients", "dequantized_weight"),
        "optimizer": (*held, *grads[critic_peak:], "optimizer_step_transient"),
    }
    if strategy == "ddp":  # the gradients summed over ranks, an fp32 bucket at a time, before the step
        parts["gradient_all_reduce"] = all_reduce_bytes(n_train + critic["numel"], largest)
        phases["all_reduce"] = static + grad_bytes + parts["gradient_all_reduce"]
        members["all_reduce"] = (*held, *grads, "gradient_all_reduce")
    members = {phase: tuple(dict.fromkeys(names)) for phase, names in members.items() if phase in phases}  # vllm once
    return MemoryEstimate(parts=parts, phases=phases, members=members, host=host, notes=notes)


# ================================================================================================
# pre-flight: compare with the device, and say what to change


def preflight(
    cfg: Config,
    model_args: ModelArgs,
    device: torch.device | str,
    prompt_tokens: int,
    *,
    free_bytes: int | None = None,
    total_bytes: int | None = None,
    margin: float = 0.05,
    verbose: bool = True,
    world_size: int = 1,
    refuse: bool = True,
) -> MemoryEstimate:
    """Print the predicted breakdown; raise MemoryPreflightError when it exceeds the free memory (of
    this rank's device, for its share of a `world_size`-process job), or with refuse=False print the
    same message as a warning (an estimate not yet measured against the device, FSDP's).

    free_bytes / total_bytes default to `torch.cuda.mem_get_info(device)`, the free bytes plus what
    torch already reserves in this process (the estimate counts the weights and optimizer state, so
    it may be called before or after they are on the device); on CPU nothing is checked (the
    estimate is still returned). The error names the settings that would make the step fit, each
    with the total it would predict. `margin` is the share of the memory kept for the allocator's
    fragmentation and the CUDA graphs' pools.
    """
    device = torch.device(device)
    if device.type == "cuda" and free_bytes is None:
        free_bytes, total_bytes = _device_memory(device)
    kw = dict(prompt_tokens=prompt_tokens, device_type=device.type, device_total=total_bytes, world_size=world_size)
    kw["device_index"] = device.index
    est = estimate_peak(cfg, model_args, **kw)

    def fixes(budget: int) -> list[tuple[str, Any, Any, int]]:
        return suggest_fixes(cfg, model_args, budget=budget, **kw)

    where = f"{device} (each of the {world_size} ranks' device)" if world_size > 1 else str(device)
    return _check_fits(est, where, free_bytes, margin, verbose, fixes, refuse=refuse)


def _check_fits(
    est: MemoryEstimate,
    device: torch.device | str,
    free_bytes: int | None,
    margin: float,
    verbose: bool,
    fixes,
    refuse: bool = True,
) -> MemoryEstimate:
    """Print `est` (verbose); return it when it fits in free_bytes less the margin (or nothing is known
    of the device), else raise MemoryPreflightError, one line naming the peak phase, its largest parts
    and `fixes(budget)` (refuse=False: print that as a warning and return)."""
    if verbose:
        print(est.table())
    if free_bytes is None:
        return est
    if free_bytes < 0 or not 0 <= margin < 1:
        raise ValueError(f"free_bytes must be >= 0 and margin in [0, 1), got {free_bytes} and {margin}")
    budget = int(free_bytes * (1 - margin))
    if est.total <= budget:
        return est
    largest = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.largest_parts())
    message = (
        f"a training step is predicted to need {format_bytes(est.total)} at its peak ({est.peak_phase} phase), "
        f"but {device} has {format_bytes(free_bytes)} free ({format_bytes(budget)} usable with a {margin:.0%} "
        f"margin). Largest parts of the {est.peak_phase} phase: {largest}. {_advice(fixes(budget), budget)}"
    )
    if not refuse:
        if verbose:
            print("warning: " + message, flush=True)
        return est
    raise MemoryPreflightError(message)


def _advice(found: Changes, budget: int) -> str:
    """What the refusal proposes: each single change that fits, else the changes that fit together,
    else what comes closest (or that nothing the pre-flight knows of lowers the peak)."""
    if found:
        each = ", or ".join(
            f"--set {key}={_show(new)} ({key}={_show(old)} -> {_show(new)}: {format_bytes(total)})"
            for key, old, new, total in found
        )
        kept, total = found.together or ({}, 0)
        together = " ".join(f"{key}={_show(value)}" for key, value in kept.items())
        same_step = f"; or, computing the same step, together ({format_bytes(total)}): --set {together}" if kept else ""
        return f"Settings that would fit, each alone: {each}{same_step}"
    kept, total = found.together or ({}, 0)
    together = " ".join(f"{key}={_show(value)}" for key, value in kept.items())
    if kept and total <= budget:
        return f"No single setting fits; together these would ({format_bytes(total)}): --set {together}"
    if kept:
        return (
            f"No setting change fits: even --set {together} together needs {format_bytes(total)}; "
            "use a device with more free memory (or more ranks), or a smaller model"
        )
    return "No setting change lowers the peak; use a device with more free memory (or more ranks), or a smaller model"


def _show(value: Any) -> str:
    """A value as `--set` takes it (YAML: true/false, null)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


_with = with_setting  # a config with one setting changed, as each suggestion is counted


def suggest_fixes(
    cfg: Config,
    model_args: ModelArgs,
    *,
    prompt_tokens: int,
    budget: int,
    device_type: str = "cuda",
    device_total: int | None = None,
    world_size: int = 1,
    device_index: int | None = None,
) -> list[tuple[str, Any, Any, int]]:
    """(key, old, new, predicted total) for each single setting change that brings the peak under
    `budget`, the least intrusive first (memory techniques before smaller batches and shorter outputs).
    device_total: the device's total bytes, which a colocated vLLM sampler takes its share of;
    world_size: the ranks of the job (a change must also pass the checks made at launch). When none fits
    alone, the result's `together` holds the set that fits combined (memory_knobs.combine)."""
    kw = dict(prompt_tokens=prompt_tokens, device_type=device_type, device_total=device_total, world_size=world_size)
    kw["device_index"] = device_index

    def total(c: Config) -> int:
        return estimate_peak(c, model_args, **kw).total

    consider, out = single_changes(cfg, total, budget, world_size=world_size)
    m, tr, g = cfg.model, cfg.train, cfg.grpo
    if world_size > 1 and not cfg.lora.enabled:  # full fine-tuning on several GPUs: shard it, whole
        consider("distributed.strategy", "fsdp")
        consider("distributed.reshard_after_forward", True)
    if cfg.sampler.kind == "vllm" and device_total:
        consider("sampler.vllm_sleep", True)
        share = vllm_share_that_fits(cfg, model_args, prompt_tokens, budget, device_total, total)
        if share is not None:
            consider("sampler.gpu_memory_utilization", share)
    consider("model.gradient_checkpointing", True)
    if m.gradient_checkpointing and device_type == "cuda":
        consider("model.activation_offload", True)
    reward_model_fixes(cfg, total, budget, out, device_type, device_index)  # fewer rows at once, bf16
    N = g.prompts_per_step * g.group_size
    smallest = rows_per_group(cfg) if cfg.algorithm == "online_dpo" else 1  # a DPO pass holds whole pairs
    for size in sorted((d for d in range(smallest, tr.micro_batch_size) if N % d == 0), reverse=True):
        if consider("train.micro_batch_size", size):
            break
    if tr.optimizer == "adamw" and device_type == "cuda" and _installed("bitsandbytes"):
        consider("train.optimizer", "adamw8bit")
    if cfg.sampler.kind == "own" and cfg.lora.enabled:  # adapters unmerged while sampling: no copy
        consider("sampler.merge_lora", False)
    if not cfg.lora.enabled:
        consider("lora.enabled", True)
    elif cfg.lora.quantize_base is None and device_type == "cuda" and _installed("bitsandbytes"):
        consider("lora.quantize_base", "nf4")
    lo = longest_that_fits(cfg, "sampler.max_new_tokens", 0, cfg.sampler.max_new_tokens, total, budget)
    if cfg.sampler.kind == "own":  # fewer rows decoded at once: the same tokens, a smaller KV cache
        rows = min(cfg.sampler.max_rows or N, N)
        while rows > 1 and not consider("sampler.max_rows", rows // 2):
            rows //= 2
    if 0 < lo < cfg.sampler.max_new_tokens:
        consider("sampler.max_new_tokens", lo)
    if cfg.env.kind is not None:  # shorter episodes: shorter rows to train on and a smaller turn cache
        turn, longest = cfg.sampler.max_new_tokens, cfg.env.max_episode_tokens  # an episode holds a turn at least
        shorter = longest_that_fits(cfg, "env.max_episode_tokens", turn, longest, total, budget)
        consider("env.max_episode_tokens", shorter)
    for size in range(g.group_size - 1, 1, -1):
        if (g.prompts_per_step * size) % tr.micro_batch_size == 0 and consider("grpo.group_size", size):
            break
    for count in range(g.prompts_per_step - 1, world_size - 1, -1):  # every rank samples a prompt at least
        if (count * g.group_size) % tr.micro_batch_size == 0 and consider("grpo.prompts_per_step", count):
            break
    reward_model_fixes(cfg, total, budget, out, device_type, device_index, keys=("device",))  # on the CPU: slow
    return combine(cfg, out, total, budget, world_size=world_size)


def _installed(package: str) -> bool:
    """Whether `package` can be imported: a setting that needs a missing one (8-bit AdamW and NF4 need
    bitsandbytes) is not proposed, since the run would stop at its package check."""
    return importlib.util.find_spec(package) is not None


# ================================================================================================
# SFT (python -m minigrpo.sft): the same model, optimizer and kernels; no sampler, reference or old
# log-probs, so two phases


def estimate_sft_peak(cfg: Config, model_args: ModelArgs, *, seq_len: int, device_type: str = "cuda") -> MemoryEstimate:
    """Predict the peak device memory of one SFT step (minigrpo/sft.py) of `cfg` on `model_args`:
        update     weights + optimizer state + gradients + one micro-batch's activations at their peak
        optimizer  weights + optimizer state + gradients + the optimizer's own temporaries
    seq_len: the longest row in tokens (capped at sft.max_seq_len). Each of the sft.micro_batch_size
    rows is counted that long, every position but the first a loss token (a reply filling the row):
    the fused LM-head cross-entropy gets all their hidden states."""
    args, b = model_args, dtype_bytes(cfg, device_type)
    T, mb = min(seq_len, cfg.sft.max_seq_len), cfg.sft.micro_batch_size
    parts = trainer_bytes(args, cfg, b)
    grads, n_train = parts.pop("gradients"), parts.pop("numel")
    parts["cuda_workspaces"] = CUDA_WORKSPACES if device_type == "cuda" else 0
    static, held = sum(parts.values()), tuple(parts)
    act = micro_batch_activations(cfg, args, mb, T, T - 1, b, device_type, objective="sft")
    parts["gradients"] = grads
    parts.update(activation_parts(act))
    masters, largest = parts["master_weights"] > 0, args.vocab_size * args.dim
    step = step_transient_bytes(n_train, masters, cfg.train.optimizer, largest, grad_b=b)  # 16-bit grads freed
    parts["optimizer_step_transient"] = step
    parts["dequantized_weight"] = dequant = dequantized_weight_bytes(args, cfg, b)
    return MemoryEstimate(
        parts=parts,
        phases={"update": static + grads + act["peak"] + dequant, "optimizer": static + grads + step},
        members={
            "update": (*held, "gradients", *ACTIVATION_PARTS, "dequantized_weight"),
            "optimizer": (*held, "gradients", "optimizer_step_transient"),
        },
        host={"activation_offload": act["offload_host"]} if act["offload_host"] else {},
        notes=optimizer_notes(cfg),
    )


def sft_preflight(
    cfg: Config,
    model_args: ModelArgs,
    device: torch.device | str,
    seq_len: int,
    *,
    free_bytes: int | None = None,
    margin: float = 0.05,
    verbose: bool = True,
) -> MemoryEstimate:
    """`preflight` for an SFT step (estimate_sft_peak): the error names the SFT settings that fit."""
    device = torch.device(device)
    if device.type == "cuda" and free_bytes is None:
        free_bytes = _device_memory(device)[0]
    est = estimate_sft_peak(cfg, model_args, seq_len=seq_len, device_type=device.type)

    def fixes(budget: int) -> list[tuple[str, Any, Any, int]]:
        return suggest_sft_fixes(cfg, model_args, seq_len=seq_len, budget=budget, device_type=device.type)

    return _check_fits(est, device, free_bytes, margin, verbose, fixes)


def suggest_sft_fixes(
    cfg: Config, model_args: ModelArgs, *, seq_len: int, budget: int, device_type: str = "cuda"
) -> list[tuple[str, Any, Any, int]]:
    """suggest_fixes for an SFT step: memory techniques, a smaller micro-batch (a divisor of
    sft.batch_size: the same step), 8-bit AdamW, adapters, then the longest sft.max_seq_len that fits."""

    def total(c: Config) -> int:
        return estimate_sft_peak(c, model_args, seq_len=seq_len, device_type=device_type).total

    consider, out = single_changes(cfg, total, budget, command="sft")
    consider("model.gradient_checkpointing", True)
    if cfg.model.gradient_checkpointing and device_type == "cuda":
        consider("model.activation_offload", True)
    sizes = (d for d in range(cfg.sft.micro_batch_size - 1, 0, -1) if cfg.sft.batch_size % d == 0)
    next((d for d in sizes if consider("sft.micro_batch_size", d)), None)  # the largest that fits
    if cfg.train.optimizer == "adamw" and device_type == "cuda" and _installed("bitsandbytes"):
        consider("train.optimizer", "adamw8bit")
    if not cfg.lora.enabled:
        consider("lora.enabled", True)
    elif cfg.lora.quantize_base is None and device_type == "cuda" and _installed("bitsandbytes"):
        consider("lora.quantize_base", "nf4")
    lo = longest_that_fits(cfg, "sft.max_seq_len", 1, min(seq_len, cfg.sft.max_seq_len), total, budget)
    if lo >= 2:  # longer conversations lose their tail
        consider("sft.max_seq_len", lo)
    return combine(cfg, out, total, budget, command="sft")


__all__ = [
    "GiB",
    "MemoryEstimate",
    "MemoryPreflightError",
    "estimate_peak",
    "estimate_sft_peak",
    "preflight",
    "sft_preflight",
    "suggest_fixes",
    "suggest_sft_fixes",
]
