"""GRPO training: `python -m minigrpo.train --config configs/X.yaml [--set key=value ...] [--resume]`.

What this is. Group Relative Policy Optimization as in DeepSeekMath / DeepSeek-R1: no value network.
Every step samples G completions for each of B prompts with the policy itself, scores them with
reward functions, turns each score into an advantage relative to its group (mean, and std), and
takes a clipped policy-gradient step that makes better-than-group completions more likely, with an
optional k3 KL penalty towards a frozen reference. Top to bottom, one step is:

    1. rollout     B prompts -> N = B*G completions (own KV-cache sampler on the live weights)
    2. rewards     N x K scores -> weighted total r (N,); failed rewards are masked, not zeroed
    3. advantages  A = group_advantages(r, G); optional dynamic sampling refills zero-spread groups
    4. log-probs   old (num_iterations > 1) and reference (beta > 0) log-probs, no grad
    5. update      micro-batches: logp (chunked LM-head kernel) -> policy_loss -> backward;
                   the normaliser is fixed for the whole step, so any micro-batch split gives the
                   same gradient; clip, optimizer step, lr schedule
    6. bookkeeping metrics, samples, plots, checkpoints (atomic; --resume continues exactly)

Under `torchrun --nproc_per_node W -m minigrpo.train ...` every rank runs this same loop on its
contiguous share of each step's B prompts (whole groups), with its own sampler; the ranks meet
only in collectives: reward totals are gathered so advantages and metrics are those of the global
batch, the loss normaliser counts tokens (dapo) or sequences (grpo, dr_grpo) over all ranks, and
gradients are reduce-scattered (FSDP2, full fine-tuning) or all-reduced (replicated weights,
LoRA). Sampling noise is a function of (seed, step, round, global row id, position, token), so W
ranks draw the very tokens one process draws, and the run equals the single-process run up to
float rounding. Rank 0 alone logs and writes checkpoints; a checkpoint resumes on any number of
ranks. See minigrpo/distributed.py.

What it is not: no value model (PPO), no separate inference copy of the weights (the sampler runs
the policy itself), no silent failure modes: stale samplers, misnormalised losses and restarts at
step 0 are each prevented by construction and tested.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minigrpo import grpo, lora, rewards
from minigrpo.checkpoint import (
    ModelStateView,
    latest_checkpoint,
    load_masters,
    load_optimizer_state,
    load_trainer_state,
    optimizer_state,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from minigrpo.config import Config, config_from_args, resolve_dtype, save_config, validate_distributed
from minigrpo.data import PromptLoader, batch_columns, build_dataset, encode_prompts
from minigrpo.distributed import (
    World,
    all_reduce_gradients,
    broadcast_trainable,
    clip_grad_norm,
    close_world,
    env_world_size,
    full_state_dict,
    full_weights,
    init_world,
    is_sharded,
    shard_model,
    shard_range,
)
from minigrpo.logprobs import completion_logprobs
from minigrpo.memory import preflight
from minigrpo.metrics import MetricsLogger
from minigrpo.models.loading import build_random, load_pretrained, load_weights, save_pretrained
from minigrpo.models.presets import preset_config
from minigrpo.optim import build_optimizer, build_scheduler
from minigrpo.sampling.params import SamplingParams, stream_key
from minigrpo.sampling.rollout import Rollout, concat_rollouts, logprob_mismatch
from minigrpo.sampling.sampler import Sampler

# ================================================================================================
# setup


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available")
    return device


def load_policy(cfg: Config, device: torch.device, dtype: torch.dtype):
    """The policy and its tokenizer: loaded (model.name_or_path) or random (model.arch), the base
    quantized to NF4 as it is read (QLoRA), then LoRA adapters added (the only trainable weights)."""
    quantize = cfg.lora.quantize_base if cfg.lora.enabled else None
    if cfg.model.arch is not None:
        model = build_random(preset_config(cfg.model.arch), dtype=dtype, device=device, seed=cfg.run.seed)
        tokenizer = None
        if quantize:
            from minigrpo.quant import quantize_model_linears

            quantize_model_linears(model, quantize, device=device)
    else:
        model, tokenizer = load_pretrained(
            cfg.model.name_or_path, dtype=dtype, device=device, revision=cfg.model.revision, quantize=quantize
        )
    if cfg.lora.enabled:  # after quantizing: adapters wrap the (NF4) base linears
        lora.apply_lora(model, cfg.lora)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.activation_offload = cfg.model.activation_offload
    return model, tokenizer


def build_sampler(cfg: Config, model, tokenizer):
    """The sampler `sampler.kind` names: the own KV-cache sampler, or a colocated vLLM engine."""
    if cfg.sampler.kind == "vllm":
        from minigrpo.sampling.vllm_sampler import VLLMSampler  # the only import of vllm

        return VLLMSampler.from_config(cfg, model, tokenizer)
    return Sampler(model, tokenizer, cuda_graphs=cfg.sampler.compile, seed=cfg.run.seed, max_rows=cfg.sampler.max_rows)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_model_fn(cfg: Config):
    """How checkpoints store the policy: the full HF checkpoint, or the PEFT adapter (+ tokenizer)."""
    if not cfg.lora.enabled:
        return save_pretrained

    def save_adapter(model, tokenizer, directory):
        lora.save_peft_adapter(
            model, directory, base_model_name_or_path=cfg.model.name_or_path or "", revision=cfg.model.revision
        )
        if tokenizer is not None:
            tokenizer.save(directory)

    return save_adapter


def reward_specs(cfg: Config) -> list[rewards.RewardSpec]:
    specs = []
    for spec in cfg.rewards:
        fn = rewards.resolve_reward(spec.name)
        if spec.kwargs:
            fn = _with_kwargs(fn, spec.kwargs, spec.name)
        specs.append(rewards.RewardSpec(spec.name, fn=fn, weight=spec.weight, timeout_s=spec.timeout_s))
    return specs


def _with_kwargs(fn, kwargs: dict, name: str):
    def bound(prompts, completions, answers, **columns):
        return fn(prompts, completions, answers, **columns, **kwargs)

    bound.__name__ = name
    return bound


def sampling_params(cfg: Config, tokenizer, n: int | None = None, temperature: float | None = None) -> SamplingParams:
    return SamplingParams(
        n=cfg.grpo.group_size if n is None else n,
        temperature=cfg.sampler.temperature if temperature is None else temperature,
        top_p=cfg.sampler.top_p,
        top_k=cfg.sampler.top_k,
        min_p=cfg.sampler.min_p,
        max_new_tokens=cfg.sampler.max_new_tokens,
        stop_ids=tuple(getattr(tokenizer, "stop_ids", ()) or ()),
        stop_strings=tuple(cfg.sampler.stop),
    )


# ================================================================================================
# one step, phase by phase


@dataclass
class Batch:
    """A scored rollout: what the update phase trains on (this rank's rows)."""

    rollout: Rollout  # N rows
    rewards: torch.Tensor  # (N,) total, NaN where nothing was scored
    advantages: torch.Tensor  # (N,)
    reward_metrics: dict[str, float]
    prompts: list[Any]
    answers: list[str]


def rollout_phase(
    cfg: Config,
    loader: PromptLoader,
    sampler,
    tokenizer,
    specs,
    params: SamplingParams,
    *,
    step: int = 0,
    world: World | None = None,
) -> Batch:
    """Sample B prompts x G completions, score them, compute advantages.

    With dynamic sampling (DAPO), groups whose rewards are all equal (zero advantage, no gradient)
    are dropped and fresh prompts are sampled in up to `max_resample_rounds` more rounds; the batch
    then holds at most B groups (fewer if the rounds ran out). Reward metrics describe the first
    round, i.e. the policy's own distribution before any filtering.

    Several ranks: every rank draws the same global prompts of a round from its loader (all loaders
    walk one order) and samples its contiguous share; round r of step s samples with the noise
    stream (seed, s, r) and global row ids, so the tokens do not depend on the split. Keep decisions,
    advantages and metrics are computed from the gathered reward totals of the whole batch.
    """
    world = world or World()
    B, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    rounds_left = 1 + (cfg.grpo.max_resample_rounds if cfg.grpo.dynamic_sampling else 0)
    parts: list[tuple[Rollout, torch.Tensor, list, list]] = []  # kept (rollout, totals, prompts, answers)
    kept, rounds, metrics = 0, 0, {}
    while kept < B and rounds < rounds_left:
        examples = loader.next_batch(B - kept)  # the round's global prompts, the same on every rank
        lo, hi = shard_range(len(examples), world.rank, world.size)
        mine = examples[lo:hi]
        rollout, scored = None, None
        if mine:
            prompt_ids, _ = encode_prompts(mine, tokenizer, cfg.data.system_prompt)
            noise = {"key": (cfg.run.seed, step, rounds), "row_ids": range(lo * G, hi * G)}
            split_invariant = getattr(sampler, "split_invariant", False)  # the own sampler takes counters
            rollout = sampler.generate(prompt_ids, params, **(noise if split_invariant else {}))
            prompts = [ex.prompt for ex in mine for _ in range(G)]
            answers = [ex.answer for ex in mine for _ in range(G)]
            columns = batch_columns(mine, repeat=G)
            columns["completion_lengths"] = rollout.completion_lengths.tolist()
            columns["max_completion_length"] = [cfg.sampler.max_new_tokens] * rollout.num_sequences
            scored = rewards.score(prompts, rollout.completion_texts, answers, specs, columns=columns)
        total = scored.total.float() if scored is not None else torch.zeros(0)  # (N_rank,)
        everyone, _ = gather_rows(world, total)  # (N_round,) in global row order
        metrics = metrics or reward_metrics(world, scored, specs)
        rounds += 1
        keep = torch.ones(len(examples), dtype=torch.bool)  # (B_round,)
        if cfg.grpo.dynamic_sampling:
            keep = ~grpo.zero_spread_groups(everyone, G)
            if not keep.any() and not kept and rounds == rounds_left:  # nothing informative at all:
                keep = torch.ones_like(keep)  # train on the last round (a zero-gradient step)
        rows = grpo.group_rows(keep[lo:hi], G).tolist()
        if rows:
            parts.append((rollout.select(rows), total[rows], [prompts[i] for i in rows], [answers[i] for i in rows]))
        kept += int(keep.sum())
    if parts:
        rollout = concat_rollouts([p[0] for p in parts], sampler.pad_id)
        total = torch.cat([p[1] for p in parts])
    else:  # a rank whose share of every round was dropped (dynamic sampling with several ranks)
        rollout, total = empty_rollout(G, sampler.pad_id, world.device), torch.zeros(0)
    # advantages of the global batch (the "batch" std is global); this rank keeps its own rows
    everyone, start = gather_rows(world, total)
    adv_all = grpo.group_advantages(everyone, G, scale=cfg.grpo.scale_rewards, estimator=cfg.grpo.advantage_estimator)
    adv = adv_all[start : start + len(total)]
    metrics = {k: v for k, v in metrics.items() if not k.startswith("reward/total")}  # "reward" below
    group_stats = {k: float(v) for k, v in grpo.group_reward_stats(everyone, G).items() if v.ndim == 0}
    metrics["reward"] = group_stats.pop("reward_mean")
    metrics.update(group_stats)
    metrics["sampling_rounds"] = float(rounds)
    return Batch(
        rollout=rollout,
        rewards=total,
        advantages=adv,
        reward_metrics=metrics,
        prompts=[x for p in parts for x in p[2]],
        answers=[x for p in parts for x in p[3]],
    )


def gather_rows(world: World, values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N_rank,) per-row values of every rank, concatenated in rank order -> ((N,) fp32 on the CPU,
    the index of this rank's first row in it)."""
    if not world.distributed:
        return values, 0
    parts = world.all_gather(values.tolist())
    start = sum(len(part) for part in parts[: world.rank])
    return torch.tensor([x for part in parts for x in part], dtype=torch.float32), start


def reward_metrics(world: World, scored: rewards.RewardResult | None, specs) -> dict[str, float]:
    """RewardResult.metrics() of the whole batch: the per-row scores and failure counts of all ranks."""
    if not world.distributed:
        return scored.metrics()
    names = [s.name for s in specs]
    local = {
        "per_fn": scored.per_fn.tolist() if scored is not None else [],
        "total": scored.total.tolist() if scored is not None else [],
        "counts": [(scored.failures, scored.timeouts, scored.nones) if scored is not None else ({}, {}, {})],
    }
    parts = world.all_gather(local)

    def summed(j: int) -> dict[str, int]:
        return {n: sum(c[j].get(n, 0) for p in parts for c in p["counts"]) for n in names}

    merged = rewards.RewardResult(
        names=names,
        weights=torch.tensor([s.weight for s in specs], dtype=torch.float64),
        per_fn=torch.tensor([row for p in parts for row in p["per_fn"]], dtype=torch.float64).reshape(-1, len(names)),
        total=torch.tensor([x for p in parts for x in p["total"]], dtype=torch.float64),
        failures=summed(0),
        timeouts=summed(1),
        nones=summed(2),
        errors={},
        seconds={},
    )
    return merged.metrics()


def empty_rollout(group_size: int, pad_id: int, device: torch.device) -> Rollout:
    """A rollout of no rows (one padding column), for a rank left without groups."""

    def zeros(*shape, dtype=torch.long):
        return torch.zeros(*shape, dtype=dtype, device=device)

    return Rollout(
        prompt_ids=zeros(0, 1) + pad_id,
        prompt_mask=zeros(0, 1),
        completion_ids=zeros(0, 1) + pad_id,
        completion_mask=zeros(0, 1),
        sampler_logp=zeros(0, 1, dtype=torch.float32),
        truncated=zeros(0, dtype=torch.bool),
        completion_texts=[],
        prompt_index=zeros(0),
        group_size=group_size,
    )


def micro_batches(rollout: Rollout, size: int):
    """Yield (rows, input_ids, attention_mask, completion_mask) per micro-batch, trimmed of columns
    that are padding in every row (left of the longest prompt, right of the longest completion)."""
    N, Tp = rollout.prompt_ids.shape
    for start in range(0, N, size):
        rows = torch.arange(start, min(start + size, N))
        pm, cm = rollout.prompt_mask[rows], rollout.completion_mask[rows]
        p0 = int((pm.sum(0) > 0).nonzero()[0]) if pm.any() else Tp - 1
        c1 = max(int(cm.sum(-1).max()), 1)
        ids = torch.cat([rollout.prompt_ids[rows, p0:], rollout.completion_ids[rows, :c1]], dim=1)
        attn = torch.cat([pm[:, p0:], cm[:, :c1]], dim=1)
        yield rows, ids, attn, cm[:, :c1]


def num_passes(world: World, model, n_rows: int, size: int) -> int:
    """Forward passes this rank makes over n_rows: its own micro-batches, or under FSDP the most of any
    rank (every pass all-gathers weights, so every rank must make the same number)."""
    mine = math.ceil(n_rows / size)
    return world.max_int(mine) if world.distributed and is_sharded(model) else mine


def idle_pass(model, device: torch.device, *, backward: bool) -> None:
    """A forward (and backward) of one dummy token that changes nothing (zero loss, zero gradient):
    what a rank with fewer micro-batches runs so it still joins every FSDP gather and reduction."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    logp = completion_logprobs(model, ids, torch.ones_like(ids), torch.ones(1, 1, dtype=torch.long, device=device))
    if backward:
        (logp.sum() * 0.0).backward()


@torch.no_grad()
def logprobs_phase(
    model, rollout: Rollout, size: int, temperature: float, *, world: World | None = None
) -> torch.Tensor:
    """(N, Tc) log-probs of the rollout's completions under `model`, without gradients (eval mode)."""
    world = world or World()
    out = torch.zeros_like(rollout.sampler_logp)
    was_training = model.training
    model.eval()
    batches = list(micro_batches(rollout, size))
    for i in range(num_passes(world, model, rollout.num_sequences, size)):
        if i >= len(batches):
            idle_pass(model, world.device, backward=False)
            continue
        rows, ids, attn, cmask = batches[i]
        out[rows, : cmask.shape[1]] = completion_logprobs(model, ids, attn, cmask, temperature=temperature)
    model.train(was_training)
    return out


def reference_logprobs(
    cfg: Config, model, ref_model, rollout: Rollout, *, world: World | None = None
) -> torch.Tensor | None:
    """Log-probs under the reference policy (beta > 0): the frozen copy, or with LoRA the same model
    with its adapters switched off (no copy at all)."""
    if cfg.grpo.beta == 0:
        return None
    size, temperature = cfg.train.micro_batch_size, cfg.sampler.temperature
    if ref_model is not None:
        return logprobs_phase(ref_model, rollout, size, temperature, world=world)
    with lora.adapters_disabled(model):
        return logprobs_phase(model, rollout, size, temperature, world=world)


def update_phase(
    cfg: Config, model, optimizer, scheduler, batch: Batch, old_logp, ref_logp, *, world: World | None = None
) -> dict[str, float]:
    """One optimizer step per iteration over the batch, in micro-batches; returns averaged stats.

    Several ranks: the normaliser's totals are summed over ranks, so after the gradient reduction
    (FSDP's reduce-scatter, or all_reduce_gradients for replicated weights) every rank holds the
    gradient of the whole batch; the stats are combined over ranks (token-weighted means, min, max).
    """
    world = world or World()
    g, r = cfg.grpo, batch.rollout
    mask = grpo.loss_mask(r.completion_mask, r.truncated, mask_truncated_completions=g.mask_truncated_completions)
    size = cfg.train.micro_batch_size
    n_micro = math.ceil(r.num_sequences / size)
    normalizer = grpo.make_normalizer(
        mask, g.loss_type, max_completion_length=cfg.sampler.max_new_tokens, num_micro_batches=max(n_micro, 1)
    )
    if world.distributed:
        normalizer = normalizer.all_reduce(device=world.device)
    passes = num_passes(world, model, r.num_sequences, size)
    replicated = world.distributed and not is_sharded(model)
    sums: dict[str, float] = {}
    weight = 0.0
    grad_norms, losses, lrs = [], [], []
    model.train()
    for _ in range(g.num_iterations):
        loss_total = 0.0
        batches = list(micro_batches(r, size))
        for i in range(passes):
            if i >= len(batches):
                idle_pass(model, world.device, backward=True)
                continue
            rows, ids, attn, cmask = batches[i]
            Tc = cmask.shape[1]
            logp, entropy = completion_logprobs(
                model, ids, attn, cmask, temperature=cfg.sampler.temperature, return_entropy=True
            )
            loss, stats = grpo.policy_loss(
                logp,
                None if old_logp is None else old_logp[rows, :Tc],
                batch.advantages[rows].to(logp.device),
                mask[rows, :Tc].to(logp.device),
                loss_type=g.loss_type,
                normalizer=normalizer,
                epsilon=g.epsilon,
                epsilon_high=g.epsilon_high,
                delta=g.delta,
                beta=g.beta,
                ref_logp=None if ref_logp is None else ref_logp[rows, :Tc],
                importance_sampling_level=g.importance_sampling_level,
                sampler_logp=r.sampler_logp[rows, :Tc] if g.is_correction else None,
                is_correction=g.is_correction,
                is_cap=g.is_cap,
                entropy=entropy.detach(),
            )
            loss.backward()
            loss_total += float(loss.detach())
            w = float(stats["active_tokens"])
            weight += w
            for k, v in stats.items():
                if k == "active_tokens":
                    continue
                if k.endswith("_min"):
                    sums[k] = min(sums.get(k, math.inf), float(v))
                elif k.endswith("_max"):
                    sums[k] = max(sums.get(k, -math.inf), float(v))
                else:
                    sums[k] = sums.get(k, 0.0) + float(v) * w
        # listed after backward: FSDP2 swaps unsharded parameters in and out (the root stays
        # unsharded after a no-grad forward), so a list made earlier may hold the wrong objects
        params = [p for p in model.parameters() if p.requires_grad]
        if replicated:
            all_reduce_gradients(params, world)
        max_norm = cfg.train.max_grad_norm or math.inf
        if world.distributed:
            grad_norms.append(clip_grad_norm(params, max_norm))
        else:
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_total)
    if world.distributed:  # the whole batch's stats: each rank's sums, extremes, token weights and losses
        sums, weight, losses = combine_stats(world.all_gather((sums, weight, losses)), world.size)
    out = {k: (v if k.endswith(("_min", "_max")) else v / max(weight, 1.0)) for k, v in sums.items()}
    out.update(loss=float(np.mean(losses)), grad_norm=float(np.mean(grad_norms)), lr=float(np.mean(lrs)))
    return out


def combine_stats(parts: list[tuple[dict, float, list]], world_size: int) -> tuple[dict, float, list]:
    """Merge per-rank (token-weighted sums / extremes, token weight, loss per iteration): sums add,
    extremes take the min / max, and each loss (a rank's share times the world size) averages."""
    sums: dict[str, float] = {}
    for part, _, _ in parts:
        for k, v in part.items():
            if k.endswith("_min"):
                sums[k] = min(sums.get(k, math.inf), v)
            elif k.endswith("_max"):
                sums[k] = max(sums.get(k, -math.inf), v)
            else:
                sums[k] = sums.get(k, 0.0) + v
    weight = sum(w for _, w, _ in parts)
    losses = [sum(p[2][i] for p in parts) / world_size for i in range(len(parts[0][2]))]
    return sums, weight, losses


def rollout_metrics(world: World, r: Rollout, device: torch.device) -> dict[str, float]:
    """Length, truncation and throughput of the whole batch's completions, and the peak memory."""
    lengths, truncated = r.completion_lengths.float(), r.truncated.float()
    local = (lengths.tolist(), truncated.tolist(), r.stats.get("tokens", 0.0), r.stats.get("total_s", 0.0))
    parts = world.all_gather((*local, _peak_memory_gb(device)))
    lengths = torch.tensor([x for p in parts for x in p[0]], dtype=torch.float32)
    truncated = torch.tensor([x for p in parts for x in p[1]], dtype=torch.float32)
    tokens, seconds = sum(p[2] for p in parts), max(p[3] for p in parts)
    return {
        "completion_len_mean": float(lengths.mean()),
        "completion_len_max": float(lengths.max()),
        "truncated_frac": float(truncated.mean()),
        "tokens_per_s": tokens / max(seconds, 1e-9),  # all ranks' tokens over the slowest rollout
        "mem/peak_gb": max(p[4] for p in parts),
    }


def mismatch_metrics(world: World, r: Rollout, old_logp: torch.Tensor) -> dict[str, float]:
    """logprob_mismatch (sampler vs trainer log-probs) over the whole batch."""
    if not world.distributed:
        return logprob_mismatch(r.sampler_logp, old_logp, r.completion_mask)
    active = r.completion_mask.bool().to(old_logp.device)
    diff = (old_logp.float() - r.sampler_logp.float().to(old_logp.device))[active].double()  # (n,)
    ratio = diff.exp()
    n = diff.numel()
    local = (n, float(diff.abs().sum()), float(ratio.sum()))
    local += (float(diff.abs().max()), float(ratio.min()), float(ratio.max())) if n else (0.0, math.inf, -math.inf)
    parts = world.all_gather(local)
    count = sum(p[0] for p in parts)
    if count == 0:  # what logprob_mismatch reports for no tokens
        return logprob_mismatch(r.sampler_logp[:0], old_logp[:0], r.completion_mask[:0])
    return {
        "logp_diff_mean": sum(p[1] for p in parts) / count,
        "logp_diff_max": max(p[3] for p in parts),
        "is_ratio_min": min(p[4] for p in parts),
        "is_ratio_mean": sum(p[2] for p in parts) / count,
        "is_ratio_max": max(p[5] for p in parts),
    }


# ================================================================================================
# the run


def train(cfg: Config) -> list[dict[str, Any]]:
    """Run (or resume) GRPO training as configured; returns the metrics of every step run.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    # ---------------------------------------------------------------- setup (config already validated)
    run_dir = cfg.run.run_dir
    if not cfg.run.resume and ((run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir) is not None):
        raise FileExistsError(
            f"{run_dir} already holds a run: continue it with --resume, or pick another run.name / run.output_dir"
        )
    validate_distributed(cfg, env_world_size())
    world = init_world(pick_device(cfg.run.device), cfg.distributed.backend, cfg.distributed.timeout_s)
    try:
        return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: Config, world: World) -> list[dict[str, Any]]:
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    say = print if world.main else _quiet
    if cfg.sampler.kind == "vllm" and cfg.grpo.is_correction is None:
        cfg.grpo.is_correction = "token_truncate"  # vLLM's kernels are not ours: correct for the mismatch
        say("sampler.kind=vllm: grpo.is_correction=token_truncate (sampler and trainer log-probs differ)")
    device = world.device
    dtype = getattr(torch, resolve_dtype(cfg.run.dtype, device.type))  # the compute dtype
    strategy = cfg.distributed.resolved_strategy(cfg.lora.enabled) if world.distributed else None
    # FSDP keeps fp32 parameters (the optimizer's masters) and computes in `dtype`
    param_dtype = torch.float32 if strategy == "fsdp" else dtype
    seed_everything(cfg.run.seed)  # every rank builds the same initial weights
    model, tokenizer = load_policy(cfg, device, param_dtype)
    if tokenizer is None:
        raise ValueError("training needs a tokenizer: model.arch builds weights only; use model.name_or_path")
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None
    state = load_trainer_state(ckpt) if ckpt is not None else None
    if state is not None:  # weights first, into the whole model: sharding comes after
        if cfg.lora.enabled:
            lora.load_peft_adapter(model, ckpt)
        else:
            load_weights(model, ckpt)
        if strategy == "fsdp":
            load_masters(model, state["optimizer"])  # the fp32 values behind a bf16 checkpoint
    # the reference policy: LoRA switches its adapters off; full fine-tuning needs a frozen copy
    frozen_copy = cfg.grpo.beta > 0 and not cfg.lora.enabled
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if frozen_copy else None
    if strategy == "fsdp":
        reshard = cfg.distributed.reshard_after_forward
        shard_model(model, world, compute_dtype=dtype, reshard_after_forward=reshard)
        if ref_model is not None:
            shard_model(ref_model, world, compute_dtype=dtype, reshard_after_forward=reshard)
    elif strategy == "ddp":
        broadcast_trainable(model, world)
    if world.rank:
        seed_everything(cfg.run.seed + world.rank)  # rank 0 keeps the run seed's stream (as one process)
    examples = build_dataset(cfg.data, cfg.data.split)
    lengths = [len(ids) for ids in encode_prompts(examples[:256], tokenizer, cfg.data.system_prompt)[0]]
    if cfg.data.max_prompt_tokens is not None:
        lengths = [len(ids) for ids in encode_prompts(examples, tokenizer, cfg.data.system_prompt)[0]]
        examples = [ex for ex, n in zip(examples, lengths) if n <= cfg.data.max_prompt_tokens]
        if not examples:
            raise ValueError(f"every prompt is longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    if device.type == "cuda" and not world.distributed:  # stop now, naming the setting to change, not OOM at step n
        preflight(cfg, model.args, device, cfg.data.max_prompt_tokens or max(lengths))
    loader = PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    specs = reward_specs(cfg)
    params = sampling_params(cfg, tokenizer)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.steps * cfg.grpo.num_iterations)
    sampler = build_sampler(cfg, model, tokenizer)

    start = 0
    if state is not None:
        start = _restore(cfg, world, state, model, optimizer, scheduler, loader)
        sampler.sync(model)  # an external sampler must see the resumed weights
        say(f"resumed from {ckpt} (step {start})")
    if world.main:
        save_config(cfg, run_dir / "config.yaml")
        if world.distributed:
            print(f"{world.size} ranks ({strategy}), {cfg.grpo.prompts_per_step // world.size}+ prompts per rank")
    logger = MetricsLogger(
        run_dir,
        total_steps=cfg.train.steps,
        start_step=start,
        print_every=cfg.log.every,
        plots=cfg.log.plots,
        tensorboard=cfg.log.tensorboard,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        progress=cfg.log.progress,
        config=cfg.to_dict(),
        enabled=world.main,
    )
    if start and world.main:
        logger.truncate_after(start)

    # ---------------------------------------------------------------- the loop
    history = []
    for step in range(start + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with full_weights(model):  # FSDP: gathered once for the whole rollout, on every rank together
            batch = rollout_phase(cfg, loader, sampler, tokenizer, specs, params, step=step, world=world)
        r = batch.rollout
        if hasattr(sampler, "sleep"):
            sampler.sleep()  # vLLM hands its GPU memory to training until the next sync
        t1 = time.perf_counter()
        need_old = cfg.grpo.num_iterations > 1 or cfg.grpo.is_correction is not None
        size = cfg.train.micro_batch_size
        old_logp = logprobs_phase(model, r, size, cfg.sampler.temperature, world=world) if need_old else None
        ref_logp = reference_logprobs(cfg, model, ref_model, r, world=world)
        t2 = time.perf_counter()
        stats = update_phase(cfg, model, optimizer, scheduler, batch, old_logp, ref_logp, world=world)
        t3 = time.perf_counter()
        sampler.sync(model)  # own sampler: nothing to copy; vLLM: push, reset the prefix cache, verify
        t4 = time.perf_counter()

        metrics = {**batch.reward_metrics, **stats, **rollout_metrics(world, r, device)}
        metrics.update({"time/rollout": t1 - t0, "time/logprobs": t2 - t1, "time/update": t3 - t2})
        metrics.update({"time/sync": t4 - t3, "time/step": t4 - t0})
        if old_logp is not None:  # how far the sampler's log-probs are from the trainer's
            metrics.update({f"mismatch/{k}": v for k, v in mismatch_metrics(world, r, old_logp).items()})
        metrics.update({f"sync/{k}": v for k, v in getattr(sampler, "last_sync", {}).items() if _is_number(v)})
        logger.log(step, metrics)
        history.append({"step": step, **metrics})
        if cfg.log.sample_every and step % cfg.log.sample_every == 0 and r.num_sequences:
            best = int(torch.nan_to_num(batch.rewards, nan=-math.inf).argmax())  # rank 0: best of its rows
            logger.sample(
                step,
                str(batch.prompts[best]),
                r.completion_texts[best],
                float(batch.rewards[best]),
                batch.answers[best],
            )
        last = step == cfg.train.steps
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_final):
            _save(cfg, world, step, model, tokenizer, optimizer, scheduler, loader, dtype)
    if cfg.lora.enabled and cfg.checkpoint.save_merged and world.main:
        # a plain HF checkpoint in the run's precision (16-bit on GPU; fp32 for CPU runs)
        lora.save_merged(model, tokenizer, run_dir / "merged", dtype=dtype)
    logger.close()
    if hasattr(sampler, "close"):
        sampler.close()
    world.barrier()
    return history


def _quiet(*args: Any, **kwargs: Any) -> None:
    """print() of the ranks that do not talk."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _save(cfg: Config, world: World, step: int, model, tokenizer, optimizer, scheduler, loader, dtype) -> None:
    """Checkpoint `step`: every rank takes part in gathering shards and RNG states; rank 0 writes."""
    sharded = is_sharded(model)
    opt = optimizer_state(model, optimizer, keep=world.main, fp32_params=sharded and dtype != torch.float32)
    rngs = world.all_gather(rng_state())
    to_save = ModelStateView(model, full_state_dict(model, world), dtype) if sharded else model
    if world.main:
        state = {"optimizer": opt, "scheduler": scheduler.state_dict(), "data": loader.state_dict()}
        save_checkpoint(
            cfg.run.run_dir,
            step,
            model=to_save,
            tokenizer=tokenizer,
            trainer_state={**state, "world_size": world.size},
            keep_last=cfg.checkpoint.keep_last,
            run_config=cfg.to_dict(),
            save_model=save_model_fn(cfg),
            rng_states=rngs,
        )
    world.barrier()  # no rank runs ahead (or resumes) before the checkpoint is complete


def _restore(cfg: Config, world: World, state: dict[str, Any], model, optimizer, scheduler, loader) -> int:
    """Load the optimizer, schedule, data cursor and RNG of a checkpoint (the weights are already in
    the model); returns its step. The checkpoint may come from any number of ranks."""
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    step = int(state["step"])
    if not restore_rng(state, world.rank, world.size):  # written by another number of ranks
        seed_everything(stream_key(cfg.run.seed, step, world.rank)[0])
    return step


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(argv, description="GRPO training (see minigrpo/train.py)"))


if __name__ == "__main__":
    main()
