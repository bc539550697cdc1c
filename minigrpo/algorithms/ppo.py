"""PPO (`algorithm: ppo`): a learned critic instead of group baselines, one training step's update.

Proximal Policy Optimization (Schulman et al. 2017) as RLHF uses it for language models (Ziegler
et al. 2019, Stiennon et al. 2020, Ouyang et al. 2022). The rollout and the rewards are the loop's
own (step.rollout_phase; grpo.group_size may be 1: every row stands alone). Then, for the step:

    old_logp, ref_logp   log-probs of the sampled tokens before the update, policy and reference
    old_values           the critic's V(s_t) of every completion token (no grad)
    rewards              -kl_coef * (old_logp - ref_logp) per token, + the row's score on its last token
    advantages, returns  GAE(gamma, lam) over each row's tokens; returns = advantages + old_values
                         advantages whitened over the whole step (ppo.whiten_advantages)
    ppo.epochs times     over ppo.mini_batches shuffled mini-batches of rows, each one optimizer step
                         of the policy and one of the critic, accumulated over micro-batches:
                             clipped policy loss                      -> backward (policy)
                             vf_coef * clipped value loss             -> backward (critic)

The formulas are in algorithms/ppo_math.py. Both losses divide by the active tokens of their
mini-batch, fixed before its first micro-batch, so any micro-batch split gives the same gradients.
The policy and the critic share no trainable weight (a LoRA critic has its own adapters on the
frozen base), so two backward passes give exactly the gradients of pg_loss + vf_coef * value_loss.
Rows whose reward could not be scored (NaN) are left out of every sum.

Several ranks (torchrun). Each rank holds its contiguous share of the step's rows (step.rollout_phase;
a row stands alone, group_size 1) and computes their log-probs, values, rewards and GAE itself:
all of that is per row. What spans rows is global: the whitening mean and variance, and every
ppo/* mean, are sums over every rank's tokens (`batch_moments`); the mini-batches are those of one
process, drawn as one permutation of the GLOBAL row indices (the same on every rank), and each rank
trains on its own rows of each; a mini-batch's token normaliser is its token count over all ranks
(from the gathered per-row counts), so the ranks' losses are shares of the whole mini-batch's and
the gradient reduction sums them: every optimizer step then sees the gradient one process computes
on the whole mini-batch, whatever the ranks' shares (a share may be empty; under FSDP such a rank
runs idle passes so that every rank joins every gather and reduction). The critic is replicated
on every rank (its gradients all-reduced in step.optimizer_step, as replicated LoRA adapters are),
both kinds: the simplest correct choice; it costs a whole critic (and its optimizer state) per
rank where FSDP shards the policy. Rank 0 writes it into checkpoints; every rank resumes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minigrpo.algorithms.ppo_math import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    per_token_rewards,
    whiten,
)
from minigrpo.algorithms.value_model import Critic, ValueModel
from minigrpo.distributed import World, combine_stats, gather_rows, merge_stats
from minigrpo.grad_scale import GradScale, grad_scale_metrics, optimizer_step
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.params import stream_key
from minigrpo.sampling.rollout import Rollout
from minigrpo.step import (
    Batch,
    idle_pass,
    logprobs_phase,
    micro_batches,
    num_passes,
    reference_pass,
)


def update(run: Any, batch: Batch) -> dict[str, float]:
    """The `algorithm: ppo` update of the loop (algorithms.UPDATES): log-prob passes, then ppo_update."""
    cfg, model, r = run.cfg, run.model, batch.rollout
    size, temperature = cfg.train.micro_batch_size, cfg.sampler.temperature
    old_logp = logprobs_phase(model, r, size, temperature, world=run.world)  # (N, Tc)
    ref_logp = None
    if cfg.ppo.kl_coef > 0:
        ref_logp = reference_pass(model, run.ref_model, r, size, temperature, world=run.world)  # (N, Tc)
    return ppo_update(
        cfg, model, run.critic, run.optimizer, run.scheduler, batch, old_logp, ref_logp,
        world=run.world, grad_scale=run.grad_scale,
    )  # fmt: skip


@torch.no_grad()
def critic_values(critic: ValueModel, rollout: Rollout, size: int) -> torch.Tensor:
    """(N, Tc) values of the rollout's completion tokens, without gradients (eval mode)."""
    out = torch.zeros_like(rollout.sampler_logp)  # (N, Tc) fp32
    critic.eval()
    with critic.active():
        for rows, ids, attn, cmask in micro_batches(rollout, size):
            out[rows, : cmask.shape[1]] = critic.values(ids, attn, cmask.shape[1])
    return out


def mini_batch_rows(n: int, count: int, key: tuple[int, ...]) -> list[torch.Tensor]:
    """`count` equal mini-batches of row indices: in order for one, else a permutation drawn from the
    stream `key` (a resumed run draws the same; so does every rank)."""
    if count == 1:
        return [torch.arange(n)]
    generator = torch.Generator().manual_seed(stream_key(*key)[0])
    return list(torch.randperm(n, generator=generator).chunk(count))


def batch_moments(world: World, tensors: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Mean and (population) variance of each (N, Tc) tensor over the active tokens of every rank:
    ppo_math.masked_mean_var of the whole batch, as sums over ranks (one round for the means, one for
    the squared deviations from them). (0, 0) when the batch has no active token."""
    active = mask > 0  # (N, Tc)
    local = {"tokens_sum": float(active.sum())}
    local.update({f"{k}_sum": float(torch.where(active, x, 0.0).sum()) for k, x in tensors.items()})
    sums, _ = merge_stats(world, local, 1.0)
    n = max(sums["tokens_sum"], 1.0)
    means = {k: sums[f"{k}_sum"] / n for k in tensors}
    local = {f"{k}_sum": float(torch.where(active, (x - means[k]).square(), 0.0).sum()) for k, x in tensors.items()}
    squares, _ = merge_stats(world, local, 1.0)
    return {k: (means[k], squares[f"{k}_sum"] / n) for k in tensors}


def ppo_update(
    cfg,
    model,
    critic: Critic,
    optimizer,
    scheduler,
    batch: Batch,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    *,
    world: World | None = None,
    grad_scale: GradScale | None = None,
) -> dict[str, float]:
    """ppo.epochs x ppo.mini_batches optimizer steps of the policy and the critic on one batch.

    Args:
        batch: the scored rollout (N rows: this rank's); batch.rewards (N,) are the sequence scores.
        old_logp: (N, Tc) log-probs of the completions under the policy before this update.
        ref_logp: (N, Tc) under the reference policy; None when ppo.kl_coef is 0.
        grad_scale: the policy's loss scale (float16; the critic has its own, critic.grad_scale).

    Returns the step's metrics (of the whole batch, all ranks): loss, grad_norm, lr, entropy and ppo/*.
    """
    world = world or World()
    grad_scale = grad_scale or GradScale()
    p, r = cfg.ppo, batch.rollout
    N, size = r.num_sequences, cfg.train.micro_batch_size
    device = old_logp.device

    # ---- the step's targets, once, before any weight moves (per row: this rank's rows alone)
    scores = batch.rewards.to(device=device, dtype=torch.float32)  # (N,)
    scored = torch.isfinite(scores)  # (N,)
    mask = r.loss_mask.to(device=device, dtype=torch.float32) * scored[:, None]  # (N, Tc) the actions
    old_values = critic_values(critic.model, r, size)  # (N, Tc)
    rewards, kl = per_token_rewards(torch.where(scored, scores, 0.0), old_logp, ref_logp, mask, p.kl_coef)
    advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)  # (N, Tc) each
    moments = batch_moments(  # over every rank's tokens
        world,
        {"advantages": advantages, "returns": returns, "values": old_values, "errors": returns - old_values, "kl": kl},
        mask,
    )
    if p.whiten_advantages:
        advantages = whiten(advantages, mask, moments=moments["advantages"])
    var_returns, var_errors = moments["returns"][1], moments["errors"][1]
    targets = {
        "ppo/advantages_mean": moments["advantages"][0],
        "ppo/advantages_std": math.sqrt(moments["advantages"][1]),
        "ppo/returns_mean": moments["returns"][0],
        "ppo/values_mean": moments["values"][0],
        # ppo_math.explained_variance of the whole batch: 1 - Var(R - V) / Var(R), NaN if R is constant
        "ppo/explained_variance": 1 - var_errors / var_returns if var_returns > 0 else math.nan,
        "ppo/kl": moments["kl"][0],  # k1 of the sampling policy vs the reference
    }
    # the active tokens of every row of the step (all ranks, global row order): mini-batch normalisers
    row_tokens, first = gather_rows(world, mask.sum(-1).cpu())  # (N_all,), this rank's first global row
    mine = slice(first, first + N)

    # ---- epochs over mini-batches: one optimizer step of each model per mini-batch
    model.train()
    critic.model.train()
    parts: list[tuple[dict[str, float], float]] = []
    steps: list[dict[str, float]] = []
    for epoch in range(p.epochs):
        key = (cfg.run.seed, scheduler.last_epoch, epoch)  # the scheduler counts the optimizer steps taken
        for rows in mini_batch_rows(len(row_tokens), p.mini_batches, key):  # global row indices
            n_tokens = int(row_tokens[rows].sum())  # the normaliser of this optimizer step, all ranks
            own = rows[(rows >= mine.start) & (rows < mine.stop)] - first  # (n,) this rank's rows of it
            batches = list(micro_batches(r.select(own), size))
            loss_total = 0.0
            for i in range(num_passes(world, model, len(own), size)):
                if i >= len(batches):  # FSDP: every rank joins every pass's collectives
                    idle_pass(model, world.device, backward=True)
                    continue
                local, ids, attn, cmask = batches[i]
                idx = own[local].to(device)
                Tc = cmask.shape[1]
                m = mask[idx, :Tc]
                logp, entropy = completion_logprobs(
                    model, ids, attn, cmask, temperature=cfg.sampler.temperature, return_entropy=True
                )  # (b, Tc) each
                pg, pg_stats = clipped_policy_loss(
                    logp, old_logp[idx, :Tc], advantages[idx, :Tc], m, p.clip_eps, n_tokens
                )
                grad_scale.scaled(pg).backward()  # this rank's share: the gradient reduction sums the ranks'
                with critic.model.active():  # the value pass's forward and backward (a LoRA critic)
                    values = critic.model.values(ids, attn, Tc)  # (b, Tc)
                    vl, v_stats = clipped_value_loss(
                        values, old_values[idx, :Tc], returns[idx, :Tc], m, p.value_clip, n_tokens
                    )
                    critic.grad_scale.scaled(p.vf_coef * vl).backward()
                loss_total += float(pg.detach()) + p.vf_coef * float(vl.detach())  # this rank's share
                tokens = float(pg_stats.pop("active_tokens"))
                stats = {**pg_stats, **v_stats, "entropy": (entropy.detach() * m).sum() / max(tokens, 1)}
                parts.append(({k: float(v) for k, v in stats.items()}, tokens))  # token-weighted means
            policy_norm, lr = optimizer_step(cfg, model, optimizer, scheduler, world, grad_scale)
            value_norm, value_lr = optimizer_step(
                cfg, critic.model, critic.optimizer, critic.scheduler, world, critic.grad_scale, critic=True
            )
            steps.append({"loss": loss_total, "grad_norm": policy_norm, "lr": lr})
            steps[-1].update({"value_grad_norm": value_norm, "value_lr": value_lr})

    # ---- metrics of the whole batch: micro-batches and ranks combined, the rank shares of the loss summed
    stats, _ = merge_stats(world, *combine_stats(parts))
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
    loss = merge_stats(world, {"loss_sum": mean["loss"]}, 1.0)[0]["loss_sum"]
    out = {"loss": loss, "grad_norm": mean["grad_norm"], "lr": mean["lr"], "entropy": stats.pop("entropy")}
    out.update({f"ppo/{k}": v for k, v in stats.items()})
    out.update({"ppo/value_grad_norm": mean["value_grad_norm"], "ppo/value_lr": mean["value_lr"]})
    out.update(targets)
    out.update(grad_scale_metrics(grad_scale))
    out.update({f"ppo/value_{k}": v for k, v in grad_scale_metrics(critic.grad_scale).items()})  # its own scale
    return out


__all__ = ["batch_moments", "critic_values", "mini_batch_rows", "ppo_update", "update"]
