"""One GRPO step, phase by phase: rollout and rewards, advantages, log-probs, the update.

    batch = rollout_phase(cfg, loader, sampler, tokenizer, specs, params, step=s)  # 1-3
    old_logp = logprobs_phase(model, batch.rollout, micro_batch_size, temperature)  # 4 (mu > 1, IS)
    ref_logp = reference_logprobs(cfg, model, ref_model, batch.rollout)             # 4 (beta > 0)
    stats = update_phase(cfg, model, optimizer, scheduler, batch, old_logp, ref_logp)  # 5

Shapes: B prompts, G completions each, N = B*G rows; Tc completion length; K reward functions.
With an environment (env.kind, minigrpo/env_config.py) a row is a whole multi-turn episode
(`play_episodes`): the rewards see the episode columns and the model's last turn as the completion,
and the later phases train on the built rows unchanged (the loss on Rollout.loss_mask).
Under torchrun every function takes the `World` and works on this rank's share of the rows; the
numbers that must be global (advantages, loss normaliser, metrics) are gathered through
minigrpo/distributed.py. The training loop (minigrpo/train.py) and the benchmarks call these.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from minigrpo import advantages, grpo, lora, rewards
from minigrpo.data import PromptLoader, batch_columns, build_messages, encode_prompts
from minigrpo.distributed import World, combine_stats, gather_rows, is_sharded, merge_stats, reshard, shard_range
from minigrpo.episodes import ENV, Environment, Episode, episode_columns, episodes_to_rollout, run_episodes
from minigrpo.grad_scale import GradScale, grad_scale_metrics, optimizer_step
from minigrpo.logprobs import completion_logprobs
from minigrpo.loop_columns import data_source, refuse_loop_columns
from minigrpo.sampling.base import Sampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout, concat_rollouts, logprob_mismatch
from minigrpo.update_loss import micro_batch_loss

# ================================================================================================
# 1-3. rollout, rewards, advantages


@dataclass
class Batch:
    """A scored rollout: what the update phase trains on (this rank's rows)."""

    rollout: Rollout  # N rows
    rewards: torch.Tensor  # (N,) fp64 total, NaN where nothing was scored
    advantages: torch.Tensor  # (N,) fp64 (the loss casts them to its own dtype)
    reward_metrics: dict[str, float]
    prompts: list[Any]
    answers: list[str]


def rollout_phase(
    cfg,
    loader: PromptLoader,
    sampler: Sampler,
    tokenizer,
    specs: list[rewards.RewardSpec],
    params: SamplingParams,
    *,
    step: int = 0,
    world: World | None = None,
    env: Environment | None = None,
) -> Batch:
    """Sample B prompts x G completions (with `env`: G episodes), score them, compute advantages.

    With dynamic sampling (DAPO), groups whose rewards are all equal (zero advantage, no gradient)
    are dropped and fresh prompts are sampled in up to `max_resample_rounds` more rounds; the batch
    then holds at most B groups (fewer if the rounds ran out). Reward metrics (reward, reward/*,
    frac_zero_spread, reward_std, ...) describe the first round, i.e. the policy's own distribution
    before any filtering; with dynamic sampling kept/* describe the groups trained on.

    Several ranks: every rank draws the same global prompts of a round from its loader (all loaders
    walk one order) and samples its contiguous share; round r of step s samples with the noise
    stream (seed, s, r) and global row ids, so the tokens do not depend on the split. Keep decisions,
    advantages and metrics are computed from the gathered reward totals of the whole batch.
    """
    world = world or World()
    B, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    rounds_left = 1 + (cfg.grpo.max_resample_rounds if cfg.grpo.dynamic_sampling else 0)
    parts: list[tuple[Rollout, torch.Tensor, list, list]] = []  # kept (rollout, totals, prompts, answers)
    sampled: dict[str, float] = {}  # every round's sampler stats (tokens, seconds), dropped groups' included
    kept, rounds, metrics, first = 0, 0, None, torch.zeros(0)
    while kept < B and rounds < rounds_left:
        examples = loader.next_batch(B - kept)  # the round's global prompts, the same on every rank
        lo, hi = shard_range(len(examples), world.rank, world.size)
        mine = examples[lo:hi]
        rollout, scored, episodes = None, None, []
        key, row_ids = (cfg.run.seed, step, rounds), range(lo * G, hi * G)
        refuse_loop_columns(examples, data_source(cfg), episodes=env is not None)
        if mine:
            columns = batch_columns(mine, repeat=G)
            if env is None:
                prompt_ids, _ = encode_prompts(mine, tokenizer, cfg.data.system_prompt, cfg.data.chat_template_kwargs)
                rollout = sampler.generate(prompt_ids, params, key=key, row_ids=row_ids)
                completions, longest = rollout.completion_texts, cfg.sampler.max_new_tokens
                seen = [build_messages(ex, cfg.data.system_prompt) for ex in mine]  # what the policy saw
                columns["prompt_messages"] = [m for m in seen for _ in range(G)]  # a reward model scores these
            else:  # one row per episode; the rewards read the episode and its last turn
                rollout, episodes = play_episodes(cfg, env, sampler, tokenizer, mine, params, key=key, row_ids=row_ids)
                rollout = rollout.to(world.device)
                columns.update(episode_columns(episodes))
                completions, longest = columns["final_response"], cfg.env.max_episode_tokens
            prompts = [ex.prompt for ex in mine for _ in range(G)]
            answers = [ex.answer for ex in mine for _ in range(G)]
            columns["completion_lengths"] = rollout.completion_lengths.tolist()  # as longest: model + tool tokens
            columns["max_completion_length"] = [longest] * rollout.num_sequences
            scored = rewards.score(prompts, completions, answers, specs, columns=columns)
            sampled = added_stats(sampled, rollout.stats)
        total = scored.total if scored is not None else torch.zeros(0, dtype=torch.float64)  # (N_rank,) fp64
        everyone, _ = gather_rows(world, total)  # (N_round,) in global row order
        if metrics is None:  # the first round: the policy's own distribution
            first = everyone
            metrics = batch_reward_result(world, scored, specs).metrics()
            if env is not None:
                turn_stats = rollout.stats if rollout is not None else {}
                metrics.update(episode_metrics(world, episodes, total, turn_stats))
        rounds += 1
        keep = torch.ones(len(examples), dtype=torch.bool)  # (B_round,)
        if cfg.grpo.dynamic_sampling:
            keep = ~advantages.zero_spread_groups(everyone, G)
            if not keep.any() and not kept and rounds == rounds_left:  # nothing informative at all:
                keep = torch.ones_like(keep)  # train on the last round (a zero-gradient step)
        rows = advantages.group_rows(keep[lo:hi], G).tolist()
        if rows:
            parts.append((rollout.select(rows), total[rows], [prompts[i] for i in rows], [answers[i] for i in rows]))
        kept += int(keep.sum())
    if parts:
        rollout = concat_rollouts([p[0] for p in parts], sampler.pad_id)
        total = torch.cat([p[1] for p in parts])
    else:  # a rank whose share of every round was dropped (dynamic sampling with several ranks)
        rollout, total = empty_rollout(G, sampler.pad_id, world.device), torch.zeros(0, dtype=torch.float64)
    rollout.stats = sampled  # tokens_per_s counts the rounds whose groups were all dropped too
    # advantages of the global batch (the "batch" std is global); this rank keeps its own rows
    everyone, start = gather_rows(world, total)
    adv_all = advantages.group_advantages(
        everyone, G, scale=cfg.grpo.scale_rewards, estimator=cfg.grpo.advantage_estimator
    )
    metrics = {k: v for k, v in metrics.items() if not k.startswith("reward/total")}  # "reward" below
    metrics.update(group_metrics(first, G))
    if cfg.grpo.dynamic_sampling:  # the groups trained on, after filtering
        kept_stats = group_metrics(everyone, G)
        metrics["kept/reward"] = kept_stats["reward"]
        metrics["kept/frac_zero_spread"] = kept_stats["frac_zero_spread"]
        metrics["kept/groups"] = float(len(everyone) // G)
    metrics["sampling_rounds"] = float(rounds)
    return Batch(
        rollout=rollout,
        rewards=total,
        advantages=adv_all[start : start + len(total)],
        reward_metrics=metrics,
        prompts=[x for p in parts for x in p[2]],
        answers=[x for p in parts for x in p[3]],
    )


def added_stats(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Two rollouts' sampler stats together: token counts and seconds add up."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


def group_metrics(totals: torch.Tensor, group_size: int) -> dict[str, float]:
    """reward (the mean valid total), reward_std / _min / _max, frac_zero_spread, frac_invalid_rows and
    mean_group_std of the (N,) reward totals of whole groups. Groups of one (PPO: the critic is the
    baseline) have no spread to speak of: no frac_zero_spread or mean_group_std then."""
    stats = {k: float(v) for k, v in advantages.group_reward_stats(totals, group_size).items() if v.ndim == 0}
    if group_size == 1:
        stats.pop("frac_zero_spread")
        stats.pop("mean_group_std")
    return {"reward": stats.pop("reward_mean"), **stats}


def play_episodes(
    cfg, env: Environment, sampler: Sampler, tokenizer, examples: list, params: SamplingParams, *, key, row_ids
) -> tuple[Rollout, list[Episode]]:
    """params.n episodes per example, turn by turn through the sampler, and their training rows (CPU)."""
    stats: dict[str, float] = {}
    episodes = run_episodes(
        sampler,
        tokenizer,
        env,
        examples,
        params,
        max_turns=cfg.env.max_turns,
        max_episode_tokens=cfg.env.max_episode_tokens,
        key=key,
        row_ids=row_ids,
        stats=stats,
    )
    rollout = episodes_to_rollout(episodes, tokenizer, pad_id=sampler.pad_id, group_size=params.n, stats=stats)
    return rollout, episodes


def episode_metrics(
    world: World, episodes: list[Episode], totals: torch.Tensor, stats: dict | None = None
) -> dict[str, float]:
    """env/* metrics of the whole batch: turns, tool calls and failures per episode, the share of
    episodes that called a tool, how they ended, and the mean reward of the episodes of k turns
    (`env/reward_turns_k`, only for counts some episode had; NaN rewards are left out). With the
    episodes' `stats` (run_episodes'): the tokens prefilled and found in the KV cache per episode
    (env/prefill_tokens_mean, env/reused_tokens_mean: reuse across turns at work)."""
    stats = stats or {}
    local: dict[str, float] = {"episodes_sum": float(len(episodes))}
    local["prefill_tokens_sum"] = float(stats.get("prefill_tokens", 0.0))
    local["reused_tokens_sum"] = float(stats.get("reused_tokens", 0.0))
    for name, values in (
        ("turns", [len(e.turns) for e in episodes]),
        ("tool_calls", [len(e.tool_calls) for e in episodes]),
        ("tool_failures", [sum(not r.ok for r in e.tool_results) for e in episodes]),
        ("tool_use", [bool(e.tool_calls) for e in episodes]),
        ("done", [e.done for e in episodes]),
        ("env_tokens", [sum(len(s.token_ids) for s in e.segments if s.owner == ENV) for e in episodes]),
    ):
        local[f"{name}_sum"] = float(sum(values))
    pairs = [(float(len(e.turns)), float(r)) for e, r in zip(episodes, totals.tolist())]
    every, _ = gather_rows(world, torch.tensor(pairs, dtype=torch.float64).reshape(-1, 2))  # (N, 2) turns, reward
    merged, _ = merge_stats(world, local, 1.0)
    n = max(merged["episodes_sum"], 1.0)
    out = {
        "env/turns_mean": merged["turns_sum"] / n,
        "env/tool_calls_mean": merged["tool_calls_sum"] / n,
        "env/tool_failures_mean": merged["tool_failures_sum"] / n,
        "env/tool_failure_frac": merged["tool_failures_sum"] / max(merged["tool_calls_sum"], 1.0),
        "env/tool_use_frac": merged["tool_use_sum"] / n,
        "env/done_frac": merged["done_sum"] / n,
        "env/env_tokens_mean": merged["env_tokens_sum"] / n,
        "env/prefill_tokens_mean": merged["prefill_tokens_sum"] / n,
        "env/reused_tokens_mean": merged["reused_tokens_sum"] / n,
    }
    for k in sorted({int(t) for t in every[:, 0].tolist()}):  # the turn counts some episode had
        scored = [r for t, r in every.tolist() if t == k and r == r]  # NaN rewards left out
        if scored:
            out[f"env/reward_turns_{k}"] = sum(scored) / len(scored)
    return out


def batch_reward_result(
    world: World, scored: rewards.RewardResult | None, specs: list[rewards.RewardSpec]
) -> rewards.RewardResult:
    """The scores of the whole batch: every rank's rows and failure counts (this rank's for one process)."""
    if not world.distributed:
        return scored
    names = [s.name for s in specs]
    per_fn = scored.per_fn if scored is not None else torch.zeros(0, len(names), dtype=torch.float64)  # (N_rank, K)
    total = scored.total if scored is not None else torch.zeros(0, dtype=torch.float64)  # (N_rank,)
    counts = {}
    for kind in ("failures", "timeouts", "nones"):
        for name in names:
            counts[f"{kind}/{name}_sum"] = float(getattr(scored, kind)[name]) if scored is not None else 0.0
    counts, _ = merge_stats(world, counts, 1.0)

    def summed(kind: str) -> dict[str, int]:
        return {name: int(counts[f"{kind}/{name}_sum"]) for name in names}

    return rewards.RewardResult(
        names=names,
        weights=torch.tensor([s.weight for s in specs], dtype=torch.float64),
        per_fn=gather_rows(world, per_fn)[0].double(),
        total=gather_rows(world, total)[0].double(),
        failures=summed("failures"),
        timeouts=summed("timeouts"),
        nones=summed("nones"),
        errors={},
        seconds={},
    )


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


# ================================================================================================
# 4. log-probs without gradients: old policy, reference policy


def micro_batches(rollout: Rollout, size: int):
    """Yield (rows, input_ids, attention_mask, completion_mask) per micro-batch of `size` rows
    (`row_batch`)."""
    N = rollout.num_sequences
    for start in range(0, N, size):
        yield row_batch(rollout, torch.arange(start, min(start + size, N)))


def row_batch(rollout: Rollout, rows: torch.Tensor):
    """(rows, input_ids, attention_mask, completion_mask) of the given rows, trimmed of columns that
    are padding in every one of them (left of the longest prompt, right of the longest completion)."""
    Tp = rollout.prompt_ids.shape[1]
    pm, cm = rollout.prompt_mask[rows], rollout.completion_mask[rows]
    p0 = int((pm.sum(0) > 0).nonzero()[0]) if pm.any() else Tp - 1
    c1 = max(int(cm.sum(-1).max()), 1)
    ids = torch.cat([rollout.prompt_ids[rows, p0:], rollout.completion_ids[rows, :c1]], dim=1)  # (b, T)
    attn = torch.cat([pm[:, p0:], cm[:, :c1]], dim=1)  # (b, T)
    return rows, ids, attn, cm[:, :c1]


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
    out = torch.zeros_like(rollout.sampler_logp)  # (N, Tc) fp32
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
    reshard(model)  # FSDP: what waits for a backward (the gain units, the root) is given back, none comes
    return out


def reference_logprobs(cfg, model, ref_model, rollout: Rollout, *, world: World | None = None) -> torch.Tensor | None:
    """Log-probs under the reference policy (beta > 0): the frozen copy, or with LoRA the same model
    with its adapters switched off (no copy at all)."""
    if cfg.grpo.beta == 0:
        return None
    return reference_pass(model, ref_model, rollout, cfg.train.micro_batch_size, cfg.sampler.temperature, world=world)


def reference_pass(
    model, ref_model, rollout: Rollout, size: int, temperature: float, *, world: World | None = None
) -> torch.Tensor:
    """(N, Tc) log-probs under the reference policy, without gradients: `ref_model` (the frozen copy
    of full fine-tuning), or with ref_model None the LoRA `model` with its adapters off."""
    if ref_model is not None:
        return logprobs_phase(ref_model, rollout, size, temperature, world=world)
    with lora.adapters_disabled(model):
        return logprobs_phase(model, rollout, size, temperature, world=world)


# ================================================================================================
# 5. the update


def update_phase(
    cfg,
    model,
    optimizer,
    scheduler,
    batch: Batch,
    old_logp,
    ref_logp,
    *,
    world: World | None = None,
    grad_scale: GradScale | None = None,
) -> dict[str, float]:
    """One optimizer step per iteration over the batch, in micro-batches; returns averaged stats.

    The loss normaliser is fixed for the whole step (all ranks' totals), so after the gradient
    reduction (FSDP's reduce-scatter, or all_reduce_gradients for replicated weights) every rank
    holds the gradient of the whole batch, whatever the micro-batch split. Stats are token-weighted
    means, minima and maxima over micro-batches and ranks.

    grad_scale: the run's loss scale (float16; see minigrpo/grad_scale.py). A scaled loss takes the
    general LM-head path: the fused one forms its gradients in the model dtype before any scale.
    old_logp None with grpo.num_iterations > 1: computed here, before the first update (without
    them every pass would be on-policy, ratio 1, and the later passes never clipped).
    """
    world, grad_scale = world or World(), grad_scale or GradScale()
    opts, r, size = grpo.LossOptions.from_config(cfg), batch.rollout, cfg.train.micro_batch_size
    if old_logp is None and cfg.grpo.num_iterations > 1:  # the policy every pass's ratio is taken against
        old_logp = logprobs_phase(model, r, size, cfg.sampler.temperature, world=world)  # (N, Tc)
    mask = grpo.loss_mask(r.loss_mask, r.truncated, mask_truncated_completions=cfg.grpo.mask_truncated_completions)
    # mask (N, Tc): the model's own tokens (a multi-turn row's environment tokens are context only)
    normalizer = grpo.make_normalizer(
        mask,
        opts.loss_type,
        max_completion_length=opts.max_completion_length,
        num_micro_batches=math.ceil(r.num_sequences / size),  # bnpo: summed over the ranks
    )
    if world.distributed:
        normalizer = normalizer.all_reduce(device=world.device)
    passes = num_passes(world, model, r.num_sequences, size)
    parts: list[tuple[dict[str, float], float]] = []  # (stats, active tokens) per micro-batch
    grad_norms, losses, lrs = [], [], []
    model.train()
    for _ in range(cfg.grpo.num_iterations):
        loss_total = 0.0
        batches = list(micro_batches(r, size))
        for i in range(passes):
            if i >= len(batches):
                idle_pass(model, world.device, backward=True)
                continue
            rows, ids, attn, cmask = batches[i]
            Tc = cmask.shape[1]
            loss, stats = micro_batch_loss(  # the fused LM head + loss where the loss allows it
                model,
                ids,
                attn,
                cmask,
                mask[rows, :Tc].to(ids.device),
                batch.advantages[rows].to(ids.device),
                opts,
                normalizer,
                old_logp=None if old_logp is None else old_logp[rows, :Tc],
                ref_logp=None if ref_logp is None else ref_logp[rows, :Tc],
                sampler_logp=r.sampler_logp[rows, :Tc] if opts.is_correction else None,
                temperature=cfg.sampler.temperature,
                fused=False if grad_scale.enabled else None,
            )
            grad_scale.scaled(loss).backward()
            loss_total += float(loss.detach())
            tokens = float(stats.pop("active_tokens"))
            parts.append(({k: float(v) for k, v in stats.items()}, tokens))
        grad_norm, lr = optimizer_step(cfg, model, optimizer, scheduler, world, grad_scale)
        grad_norms.append(grad_norm)
        lrs.append(lr)
        losses.append(loss_total)  # this rank's share of the whole batch's loss
    stats, _ = merge_stats(world, *combine_stats(parts))
    known, weights = stats.pop("is_weight_tokens_sum", None), stats.pop("is_weight_sum", 0.0)
    if known is not None:  # IS weights: over the tokens whose weight is known (NaN: none), whatever the split
        stats |= {f"is_weight_{k}": stats.get(f"is_weight_{k}", math.nan) for k in ("min", "max")}
        stats["is_weight_mean"] = weights / known if known else math.nan
    loss = merge_stats(world, {"loss_sum": sum(losses) / len(losses)}, 1.0)[0]["loss_sum"]
    return {
        **stats,
        "loss": loss,
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": sum(lrs) / len(lrs),
        **grad_scale_metrics(grad_scale),
    }


# ================================================================================================
# the step's other numbers


def rollout_metrics(world: World, r: Rollout, device: torch.device) -> dict[str, float]:
    """Length, truncation and throughput of the whole batch's completions, and the peak memory."""
    local: dict[str, float] = {"tokens_sum": r.stats.get("tokens", 0.0), "seconds_max": r.stats.get("total_s", 0.0)}
    local["peak_gb_max"] = peak_memory_gb(device)
    if r.num_sequences:
        lengths, ended = r.completion_lengths.double(), ~r.truncated  # (N,) each
        local |= {"completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max())}
        local |= {"completion_len_min": float(lengths.min()), "truncated_frac": float(r.truncated.double().mean())}
        local |= {"ended_len_sum": float(lengths[ended].sum()), "ended_rows_sum": float(ended.sum())}
    merged, _ = merge_stats(world, local, max(r.num_sequences, 1e-9))
    nan = float("nan")  # the rows that ended (a stop, not the length limit): their mean length, as TRL logs it
    ended_mean = merged["ended_len_sum"] / merged["ended_rows_sum"] if merged.get("ended_rows_sum") else nan
    return {
        **{k: merged.get(k, nan) for k in ("completion_len_mean", "completion_len_min", "completion_len_max")},
        "ended_len_mean": ended_mean,
        "truncated_frac": merged.get("truncated_frac", nan),
        "tokens_per_s": merged["tokens_sum"] / max(merged["seconds_max"], 1e-9),  # all ranks over the slowest
        "mem/peak_gb": merged["peak_gb_max"],
    }


def mismatch_metrics(world: World, r: Rollout, old_logp: torch.Tensor) -> dict[str, float]:
    """logprob_mismatch (sampler vs trainer log-probs) over the whole batch, token-weighted."""
    tokens = float(r.loss_mask.sum())  # the sampled tokens (a multi-turn row's environment tokens were not)
    merged, total = merge_stats(world, logprob_mismatch(r.sampler_logp, old_logp, r.loss_mask), tokens)
    return merged if total else logprob_mismatch(r.sampler_logp[:0], old_logp[:0], r.loss_mask[:0])


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak RSS on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, KiB on Linux
