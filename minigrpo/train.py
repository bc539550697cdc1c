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
from minigrpo.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from minigrpo.config import Config, config_from_args, resolve_dtype, save_config
from minigrpo.data import PromptLoader, batch_columns, build_dataset, encode_prompts
from minigrpo.logprobs import completion_logprobs
from minigrpo.memory import preflight
from minigrpo.metrics import MetricsLogger
from minigrpo.models.loading import build_random, load_pretrained, load_weights, save_pretrained
from minigrpo.models.presets import preset_config
from minigrpo.optim import build_optimizer, build_scheduler
from minigrpo.sampling.params import SamplingParams
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
    return Sampler(model, tokenizer, cuda_graphs=cfg.sampler.compile)


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
    """A scored rollout: what the update phase trains on."""

    rollout: Rollout  # N rows
    rewards: torch.Tensor  # (N,) total, NaN where nothing was scored
    advantages: torch.Tensor  # (N,)
    reward_metrics: dict[str, float]
    prompts: list[Any]
    answers: list[str]


def rollout_phase(cfg: Config, loader: PromptLoader, sampler, tokenizer, specs, params: SamplingParams) -> Batch:
    """Sample B prompts x G completions, score them, compute advantages.

    With dynamic sampling (DAPO), groups whose rewards are all equal (zero advantage, no gradient)
    are dropped and fresh prompts are sampled in up to `max_resample_rounds` more rounds; the batch
    then holds at most B groups (fewer if the rounds ran out). Reward metrics describe the first
    round, i.e. the policy's own distribution before any filtering.
    """
    B, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    rounds_left = 1 + (cfg.grpo.max_resample_rounds if cfg.grpo.dynamic_sampling else 0)
    parts: list[tuple[Rollout, torch.Tensor, list, list]] = []  # kept (rollout, totals, prompts, answers)
    kept, rounds, metrics = 0, 0, {}
    while kept < B and rounds < rounds_left:
        examples = loader.next_batch(B - kept)
        prompt_ids, _ = encode_prompts(examples, tokenizer, cfg.data.system_prompt)
        rollout = sampler.generate(prompt_ids, params)
        prompts = [ex.prompt for ex in examples for _ in range(G)]
        answers = [ex.answer for ex in examples for _ in range(G)]
        columns = batch_columns(examples, repeat=G)
        columns["completion_lengths"] = rollout.completion_lengths.tolist()
        columns["max_completion_length"] = [cfg.sampler.max_new_tokens] * rollout.num_sequences
        scored = rewards.score(prompts, rollout.completion_texts, answers, specs, columns=columns)
        total = scored.total.float()  # (N,)
        metrics = metrics or scored.metrics()
        rounds += 1
        keep = torch.ones(len(examples), dtype=torch.bool)  # (B_round,)
        if cfg.grpo.dynamic_sampling:
            keep = ~grpo.zero_spread_groups(total, G)
            if not keep.any() and not parts and rounds == rounds_left:  # nothing informative at all:
                keep = torch.ones_like(keep)  # train on the last round (a zero-gradient step)
        rows = grpo.group_rows(keep, G).tolist()
        if rows:
            parts.append((rollout.select(rows), total[rows], [prompts[i] for i in rows], [answers[i] for i in rows]))
            kept += int(keep.sum())
    rollout = concat_rollouts([p[0] for p in parts], sampler.pad_id)
    total = torch.cat([p[1] for p in parts])
    adv = grpo.group_advantages(total, G, scale=cfg.grpo.scale_rewards, estimator=cfg.grpo.advantage_estimator)
    metrics = {k: v for k, v in metrics.items() if not k.startswith("reward/total")}  # "reward" below
    group_stats = {k: float(v) for k, v in grpo.group_reward_stats(total, G).items() if v.ndim == 0}
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


@torch.no_grad()
def logprobs_phase(model, rollout: Rollout, size: int, temperature: float) -> torch.Tensor:
    """(N, Tc) log-probs of the rollout's completions under `model`, without gradients (eval mode)."""
    out = torch.zeros_like(rollout.sampler_logp)
    was_training = model.training
    model.eval()
    for rows, ids, attn, cmask in micro_batches(rollout, size):
        out[rows, : cmask.shape[1]] = completion_logprobs(model, ids, attn, cmask, temperature=temperature)
    model.train(was_training)
    return out


def reference_logprobs(cfg: Config, model, ref_model, rollout: Rollout) -> torch.Tensor | None:
    """Log-probs under the reference policy (beta > 0): the frozen copy, or with LoRA the same model
    with its adapters switched off (no copy at all)."""
    if cfg.grpo.beta == 0:
        return None
    size, temperature = cfg.train.micro_batch_size, cfg.sampler.temperature
    if ref_model is not None:
        return logprobs_phase(ref_model, rollout, size, temperature)
    with lora.adapters_disabled(model):
        return logprobs_phase(model, rollout, size, temperature)


def update_phase(cfg: Config, model, optimizer, scheduler, batch: Batch, old_logp, ref_logp) -> dict[str, float]:
    """One optimizer step per iteration over the batch, in micro-batches; returns averaged stats."""
    g, r = cfg.grpo, batch.rollout
    mask = grpo.loss_mask(r.completion_mask, r.truncated, mask_truncated_completions=g.mask_truncated_completions)
    size = cfg.train.micro_batch_size
    n_micro = math.ceil(r.num_sequences / size)
    normalizer = grpo.make_normalizer(
        mask, g.loss_type, max_completion_length=cfg.sampler.max_new_tokens, num_micro_batches=n_micro
    )
    sums: dict[str, float] = {}
    weight = 0.0
    grad_norms, losses, lrs = [], [], []
    model.train()
    for _ in range(g.num_iterations):
        loss_total = 0.0
        for rows, ids, attn, cmask in micro_batches(r, size):
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
        max_norm = cfg.train.max_grad_norm or math.inf
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_total)
    out = {k: (v if k.endswith(("_min", "_max")) else v / max(weight, 1.0)) for k, v in sums.items()}
    out.update(loss=float(np.mean(losses)), grad_norm=float(np.mean(grad_norms)), lr=float(np.mean(lrs)))
    return out


# ================================================================================================
# the run


def train(cfg: Config) -> list[dict[str, Any]]:
    """Run (or resume) GRPO training as configured; returns the metrics of every step run."""
    # ---------------------------------------------------------------- setup (config already validated)
    run_dir = cfg.run.run_dir
    if not cfg.run.resume and ((run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir) is not None):
        raise FileExistsError(
            f"{run_dir} already holds a run: continue it with --resume, or pick another run.name / run.output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.sampler.kind == "vllm" and cfg.grpo.is_correction is None:
        cfg.grpo.is_correction = "token_truncate"  # vLLM's kernels are not ours: correct for the mismatch
        print("sampler.kind=vllm: grpo.is_correction=token_truncate (sampler and trainer log-probs differ)")
    device = pick_device(cfg.run.device)
    dtype = getattr(torch, resolve_dtype(cfg.run.dtype, device.type))
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = load_policy(cfg, device, dtype)
    if tokenizer is None:
        raise ValueError("training needs a tokenizer: model.arch builds weights only; use model.name_or_path")
    # the reference policy: LoRA switches its adapters off; full fine-tuning needs a frozen copy
    frozen_copy = cfg.grpo.beta > 0 and not cfg.lora.enabled
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if frozen_copy else None
    examples = build_dataset(cfg.data, cfg.data.split)
    lengths = [len(ids) for ids in encode_prompts(examples[:256], tokenizer, cfg.data.system_prompt)[0]]
    if cfg.data.max_prompt_tokens is not None:
        lengths = [len(ids) for ids in encode_prompts(examples, tokenizer, cfg.data.system_prompt)[0]]
        examples = [ex for ex, n in zip(examples, lengths) if n <= cfg.data.max_prompt_tokens]
        if not examples:
            raise ValueError(f"every prompt is longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    if device.type == "cuda":  # stop now, naming the setting to change, rather than OOM at step n
        preflight(cfg, model.args, device, cfg.data.max_prompt_tokens or max(lengths))
    loader = PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    specs = reward_specs(cfg)
    params = sampling_params(cfg, tokenizer)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, cfg.train.steps * cfg.grpo.num_iterations)
    sampler = build_sampler(cfg, model, tokenizer)

    start = 0
    if cfg.run.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        start = _restore(cfg, ckpt, model, optimizer, scheduler, loader)
        sampler.sync(model)  # an external sampler must see the resumed weights
        print(f"resumed from {ckpt} (step {start})")
    save_config(cfg, run_dir / "config.yaml")
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
    )
    if start:
        logger.truncate_after(start)

    # ---------------------------------------------------------------- the loop
    history = []
    for step in range(start + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = rollout_phase(cfg, loader, sampler, tokenizer, specs, params)
        r = batch.rollout
        if hasattr(sampler, "sleep"):
            sampler.sleep()  # vLLM hands its GPU memory to training until the next sync
        t1 = time.perf_counter()
        need_old = cfg.grpo.num_iterations > 1 or cfg.grpo.is_correction is not None
        old_logp = logprobs_phase(model, r, cfg.train.micro_batch_size, cfg.sampler.temperature) if need_old else None
        ref_logp = reference_logprobs(cfg, model, ref_model, r)
        t2 = time.perf_counter()
        stats = update_phase(cfg, model, optimizer, scheduler, batch, old_logp, ref_logp)
        t3 = time.perf_counter()
        sampler.sync(model)  # own sampler: nothing to copy; vLLM: push, reset the prefix cache, verify
        t4 = time.perf_counter()

        lengths = r.completion_lengths.float()
        metrics = {
            **batch.reward_metrics,
            **stats,
            "completion_len_mean": float(lengths.mean()),
            "completion_len_max": float(lengths.max()),
            "truncated_frac": float(r.truncated.float().mean()),
            "tokens_per_s": r.stats.get("tokens", 0.0) / max(r.stats.get("total_s", 0.0), 1e-9),
            "time/rollout": t1 - t0,
            "time/logprobs": t2 - t1,
            "time/update": t3 - t2,
            "time/sync": t4 - t3,
            "time/step": t4 - t0,
            "mem/peak_gb": _peak_memory_gb(device),
        }
        if old_logp is not None:  # how far the sampler's log-probs are from the trainer's
            mismatch = logprob_mismatch(r.sampler_logp, old_logp, r.completion_mask)
            metrics.update({f"mismatch/{k}": v for k, v in mismatch.items()})
        metrics.update({f"sync/{k}": v for k, v in getattr(sampler, "last_sync", {}).items() if _is_number(v)})
        logger.log(step, metrics)
        history.append({"step": step, **metrics})
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            best = int(torch.nan_to_num(batch.rewards, nan=-math.inf).argmax())
            logger.sample(
                step,
                str(batch.prompts[best]),
                r.completion_texts[best],
                float(batch.rewards[best]),
                batch.answers[best],
            )
        last = step == cfg.train.steps
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_final):
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data": loader.state_dict(),
            }
            save_checkpoint(
                run_dir,
                step,
                model=model,
                tokenizer=tokenizer,
                trainer_state=state,
                keep_last=cfg.checkpoint.keep_last,
                run_config=cfg.to_dict(),
                save_model=save_model_fn(cfg),
            )
    if cfg.lora.enabled and cfg.checkpoint.save_merged:
        # a plain HF checkpoint in the run's precision (16-bit on GPU; fp32 for CPU runs)
        lora.save_merged(model, tokenizer, run_dir / "merged", dtype=dtype)
    logger.close()
    if hasattr(sampler, "close"):
        sampler.close()
    return history


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _restore(cfg: Config, ckpt, model, optimizer, scheduler, loader) -> int:
    """Load weights (or adapters) and every piece of trainer state of a checkpoint; returns its step."""
    state = load_trainer_state(ckpt)
    if cfg.lora.enabled:
        lora.load_peft_adapter(model, ckpt)
    else:
        load_weights(model, ckpt)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return int(state["step"])


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(argv, description="GRPO training (see minigrpo/train.py)"))


if __name__ == "__main__":
    main()
