"""GRPO training: `python -m minigrpo.train --config configs/X.yaml [--set key=value ...] [--resume]`.

What this is. Group Relative Policy Optimization as in DeepSeekMath / DeepSeek-R1: no value network.
Every step samples G completions for each of B prompts with the policy itself, scores them with
reward functions, turns each score into an advantage relative to its group (mean, and std), and
takes a clipped policy-gradient step that makes better-than-group completions more likely, with an
optional k3 KL penalty towards a frozen reference. This file reads top to bottom:

    building   check everything the config and the file system allow, then load the policy and
               build reference, sampler, optimizer, data and rewards (minigrpo/build.py)
    the loop   one step after another; every step is (minigrpo/step.py):
      1. rollout     B prompts -> N = B*G completions (own KV-cache sampler on the live weights, or vLLM);
                     with env.kind, N multi-turn episodes (tool calls and results), one row each
      2. rewards     N x K scores -> weighted total r (N,); failed rewards are masked, not zeroed
      3. advantages  A = group_advantages(r, G); optional dynamic sampling refills zero-spread groups
      4. log-probs   old (num_iterations > 1, IS correction) and reference (beta > 0), no grad
      5. update      micro-batches: the policy loss of the completions -> backward, with a normaliser
                     fixed for the whole step (any micro-batch split, same gradient); the LM head and
                     a token-level loss run fused, gradients made in the forward (update_loss.py)
      4-5. instead   `algorithm: online_dpo`: preference pairs from each group's rewards, trained with
                     the DPO loss against the reference (minigrpo/algorithms/, the one branch below);
                     `algorithm: ppo`: a critic, per-token rewards with a KL penalty, GAE and clipped
                     policy and value losses over several epochs (minigrpo/algorithms/ppo.py)
      6. bookkeeping metrics, samples, plots, checkpoints (atomic; --resume continues exactly;
                   minigrpo/bookkeeping.py, shared with python -m minigrpo.sft)

Under `torchrun --nproc_per_node W -m minigrpo.train ...` every rank runs this same loop on its
contiguous share of each step's prompts (whole groups); the ranks meet only in the collectives of
minigrpo/distributed.py, and the run equals the single-process run up to float rounding. Rank 0
alone logs and writes checkpoints; a checkpoint resumes on any number of ranks.

What it is not: no value model in GRPO (PPO's critic is its own algorithm), no separate inference
copy of the weights (the own sampler runs the policy itself), no silent failure modes: stale
samplers, misnormalised losses and restarts at step 0 are each prevented by construction and tested.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from minigrpo import lora
from minigrpo.algorithms import update_fn
from minigrpo.bookkeeping import open_logger, save, until_interrupted
from minigrpo.build import (
    Run,
    build_run,
    check_before_loading,
    compute_dtype,
    load_checkpoint_weights,
    load_policy,
    pick_device,
)
from minigrpo.config import Config, config_from_args
from minigrpo.distributed import checked_on_every_rank, close_world, env_world_size, full_weights, init_world
from minigrpo.errors import run_cli
from minigrpo.metrics import MetricsLogger
from minigrpo.run_folder import ResumePoint, finish_run, run_dir_held, write_folder_whole
from minigrpo.step import (
    logprobs_phase,
    mismatch_metrics,
    reference_logprobs,
    rollout_metrics,
    rollout_phase,
    update_phase,
)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command line: a mistake in the config or the files is one `error:` line (exit status 2);
    Ctrl-C is one `interrupted:` line saying how the run stands (exit status 130): complete, lacking
    final outputs that --resume writes, or the checkpoint to continue from."""

    def run(args: list[str] | None) -> list[dict[str, Any]]:
        cfg = config_from_args(args, description="GRPO training (minigrpo/train.py)", prog="minigrpo.train")
        return until_interrupted(train, cfg, final_folders(cfg))

    return run_cli(run, argv)


# ================================================================================================
# building the run


def train(cfg: Config) -> list[dict[str, Any]]:
    """Run (or resume) GRPO training as configured; returns the metrics of every step run.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; see the module docstring.
    """
    with run_dir_held(cfg):  # first: a second process on this run folder stops here (rank 0 holds it)
        # before any weights load; under torchrun every rank checks, rank 0 alone prints a mistake
        resume, specs, examples = checked_on_every_rank(lambda: check_before_loading(cfg, env_world_size()))
        if resume is not None and resume.step >= cfg.train.steps:  # killed after its final checkpoint, or complete
            return finish_run(cfg, resume, final_folders(cfg), lambda names: write_merged_from(cfg, resume))
        world = init_world(pick_device(cfg.run.device), cfg.distributed.backend, cfg.distributed.timeout_s)
        try:
            return loop(build_run(cfg, world, resume, specs, examples))
        finally:
            close_world(world)


MERGED = "merged"  # run_dir/merged: a LoRA run's adapters merged into its base (checkpoint.save_merged)


def final_folders(cfg: Config) -> tuple[str, ...]:
    """The folders a run writes into run_dir after its last step."""
    return (MERGED,) if cfg.lora.enabled and cfg.checkpoint.save_merged else ()


def write_merged(model: torch.nn.Module, tokenizer, out, dtype: torch.dtype) -> None:
    """A plain HF checkpoint in the run's precision (16-bit on GPU; fp32 for CPU runs), written whole."""
    write_folder_whole(out, lambda folder: lora.save_merged(model, tokenizer, folder, dtype=dtype))


def write_merged_from(cfg: Config, resume: ResumePoint) -> None:
    """The merged export of a finished LoRA run, from its final checkpoint's adapter."""
    device = pick_device(cfg.run.device)
    dtype = compute_dtype(cfg, device)
    model, tokenizer = load_policy(cfg, device, dtype)
    load_checkpoint_weights(cfg, model, resume.path)
    write_merged(model, tokenizer, cfg.run.run_dir / MERGED, dtype)


# ================================================================================================
# the loop


def loop(run: Run) -> list[dict[str, Any]]:
    """Steps start_step+1 .. train.steps (rollout, log-probs, update, sync, bookkeeping), then the
    merged export of a LoRA run; the logger and the sampler are closed however the loop ends."""
    cfg, world, model, sampler = run.cfg, run.world, run.model, run.sampler
    logger = open_logger(run)
    try:
        history = steps(run, logger)
        if MERGED in final_folders(cfg) and world.main:
            write_merged(model, run.tokenizer, cfg.run.run_dir / MERGED, run.dtype)
    finally:  # after Ctrl-C or an error too: final curves, files and backends flushed, the sampler shut down
        logger.close()
        sampler.close()
    world.barrier()
    return history


def steps(run: Run, logger: MetricsLogger) -> list[dict[str, Any]]:
    """Steps start_step+1 .. train.steps; returns the metrics of each."""
    cfg, world, model, sampler = run.cfg, run.world, run.model, run.sampler
    device = world.device
    history = []
    for step in range(run.start_step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # 1-3. rollout, rewards, advantages (FSDP: weights gathered once for the whole rollout)
        with full_weights(model):
            batch = rollout_phase(
                cfg, run.loader, sampler, run.tokenizer, run.specs, run.params, step=step, world=world, env=run.env
            )
        sampler.sleep()  # vLLM hands its GPU memory to training until the next sync
        t1 = time.perf_counter()
        r = batch.rollout
        if cfg.algorithm == "grpo":
            # 4. log-probs of the sampled tokens before the update: old policy, reference policy
            need_old = cfg.grpo.num_iterations > 1 or cfg.grpo.is_correction is not None
            mb, temperature = cfg.train.micro_batch_size, cfg.sampler.temperature
            old_logp = logprobs_phase(model, r, mb, temperature, world=world) if need_old else None
            ref_logp = reference_logprobs(cfg, model, run.ref_model, r, world=world)
            t2 = time.perf_counter()
            # 5. the update
            stats = update_phase(
                cfg, model, run.optimizer, run.scheduler, batch, old_logp, ref_logp,
                world=world, grad_scale=run.grad_scale,
            )  # fmt: skip
        else:  # 4-5. online DPO, PPO: its own log-prob passes and update on the scored batch
            old_logp, t2 = None, t1
            stats = update_fn(cfg.algorithm)(run, batch)
        t3 = time.perf_counter()
        sampler.sync(model)  # own sampler: nothing to copy; vLLM: push, reset the prefix cache, verify
        t4 = time.perf_counter()

        # 6. bookkeeping
        metrics = {**batch.reward_metrics, **stats, **rollout_metrics(world, r, device)}
        metrics.update({"time/rollout": t1 - t0, "time/logprobs": t2 - t1, "time/update": t3 - t2})
        metrics.update({"time/sync": t4 - t3, "time/step": t4 - t0})
        if old_logp is not None:  # how far the sampler's log-probs are from the trainer's
            metrics.update({f"mismatch/{k}": v for k, v in mismatch_metrics(world, r, old_logp).items()})
        metrics.update({f"sync/{k}": v for k, v in sampler.last_sync.items()})
        logger.log(step, metrics)
        history.append({"step": step, **metrics})
        if cfg.log.sample_every and step % cfg.log.sample_every == 0 and r.num_sequences:
            best = int(torch.nan_to_num(batch.rewards, nan=-math.inf).argmax())  # rank 0: best of its rows
            reward = float(batch.rewards[best])
            logger.sample(step, str(batch.prompts[best]), r.completion_texts[best], reward, batch.answers[best])
        last = step == cfg.train.steps
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_final):
            save(run, step)
    return history


if __name__ == "__main__":
    main()
