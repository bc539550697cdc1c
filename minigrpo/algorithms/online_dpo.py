"""Online DPO on the GRPO loop (`algorithm: online_dpo`): preferences from the reward functions.

    stats = update(run, batch)     # train.loop calls this where GRPO calls step.update_phase

Every step the policy samples G completions for each of B prompts on its live weights and the
reward functions score them (step.rollout_phase, as in GRPO). Then, instead of advantages:

    1. pairs      per group, completions ranked by their reward totals become (chosen, rejected)
                  pairs: best against worst, or every ranked two (dpo.pairs); ties and unscored
                  rows are skipped and counted (algorithms/dpo.py: preference_pairs)
    2. reference  sequence log-probs of the rows some pair uses under the reference policy, without
                  gradients: the frozen copy of the initial weights, or with LoRA the same model
                  with its adapters off (step.reference_pass)
    3. update     per micro-batch of whole groups: the rows' sequence log-probs under the policy
                  (with grad), the DPO / IPO loss of the groups' pairs divided by the step's pair
                  count (dpo.dpo_loss), backward; then the optimizer step GRPO takes too
                  (step.optimizer_step: clip, optimizer, schedule). grpo.num_iterations repeats 3.

This is Online DPO in the sense of Guo et al. 2024 ("Direct Language Model Alignment from Online
AI Feedback"): the pairs come from the current policy every step and are labelled by a scorer
(here the reward functions), and the loss is DPO's (Rafailov et al. 2023) against a fixed reference.

Why micro-batches of whole groups: a pair never spans two groups, so the step's loss is a sum over
groups and any packing of groups into passes gives the same gradient (tested with
micro_batch_size 2 and 8); with dpo.pairs=all a row in several pairs is also computed only once.
Log-probs are those of the sampling distribution, log_softmax(logits / sampler.temperature), for
the policy and the reference alike (as GRPO's).

Several ranks (torchrun): each rank holds whole groups (rollout_phase), so its pairs are its own;
the pair count is summed over the ranks, so each rank's loss is its share of the whole batch's
mean loss and the gradient reduction sums the shares: every rank steps with the whole batch's gradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from minigrpo.algorithms import dpo
from minigrpo.distributed import World, combine_stats, is_sharded, merge_stats
from minigrpo.grad_scale import GradScale, grad_scale_metrics, optimizer_step
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.rollout import Rollout
from minigrpo.step import Batch, idle_pass, reference_pass, row_batch

# the pair statistics of dpo.dpo_loss, reported as dpo/<name> (means over the step's pairs)
PAIR_STATS = ("accuracy", "margin", "logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected")


@dataclass
class PairBatch:
    """One step's preference pairs (this rank's), over a rollout of the rows some pair uses."""

    rollout: Rollout  # n rows: the used rows of the batch, group by group, in the batch's order
    chosen: torch.Tensor  # (P,) long: the preferred completion's row in `rollout`
    rejected: torch.Tensor  # (P,) long: the other completion's row
    groups: list[tuple[int, int]]  # [start, end) rows of each group in `rollout` (adjacent, in order)
    ties: int  # candidate pairs the rewards did not rank (skipped)
    unscored: int  # rows of the batch with a NaN reward total


def make_pairs(batch: Batch, group_size: int, pairs: str) -> PairBatch:
    """The batch's pairs (dpo.preference_pairs on its reward totals) and the rows they use."""
    chosen, rejected, ties = dpo.preference_pairs(batch.rewards, group_size, pairs)
    used = sorted(set(chosen.tolist()) | set(rejected.tolist()))  # batch rows, groups stay contiguous
    new_index = {row: i for i, row in enumerate(used)}
    group_rows: dict[int, list[int]] = {}
    for row in used:
        group_rows.setdefault(row // group_size, []).append(new_index[row])

    def renumber(rows: torch.Tensor) -> torch.Tensor:
        return torch.tensor([new_index[i] for i in rows.tolist()], dtype=torch.long)  # (P,)

    return PairBatch(
        rollout=batch.rollout.select(used),
        chosen=renumber(chosen),
        rejected=renumber(rejected),
        groups=[(rows[0], rows[-1] + 1) for rows in group_rows.values()],
        ties=ties,
        unscored=int(torch.isnan(batch.rewards).sum()),
    )


def pack_groups(groups: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Adjacent groups' row ranges packed into passes of at most `size` rows (a larger group alone)."""
    passes: list[tuple[int, int]] = []
    for start, end in groups:
        if passes and end - passes[-1][0] <= size:
            passes[-1] = (passes[-1][0], end)
        else:
            passes.append((start, end))
    return passes


def pair_backward(
    model,
    pairs: PairBatch,
    ref_seq: torch.Tensor,
    opts: Any,
    *,
    size: int,
    temperature: float,
    num_pairs: int,
    world: World | None = None,
    grad_scale: GradScale | None = None,
) -> tuple[list[tuple[dict[str, float], float]], float]:
    """Accumulate the gradient of the step's DPO loss over this rank's pairs, a pass per packed
    micro-batch of whole groups (at most `size` rows). No optimizer step.

    Args:
        ref_seq: (n,) sequence log-probs of pairs.rollout's rows under the reference.
        opts: the dpo section (beta, loss, label_smoothing).
        num_pairs: the pairs of the whole step, all ranks (the loss's divisor).
        grad_scale: the run's loss scale (float16), applied to each backward.
    Returns ([(pair stats, pairs)] per pass, this rank's summed loss).
    """
    world = world or World()
    grad_scale = grad_scale or GradScale()
    loss_mask = pairs.rollout.loss_mask  # (n, Tc) the model's own tokens
    passes = pack_groups(pairs.groups, size)
    count = world.max_int(len(passes)) if world.distributed and is_sharded(model) else len(passes)
    parts: list[tuple[dict[str, float], float]] = []
    loss_total = 0.0
    model.train()
    for i in range(count):
        if i >= len(passes):  # FSDP: every rank joins every pass's collectives
            idle_pass(model, world.device, backward=True)
            continue
        start, end = passes[i]
        rows, ids, attn, cmask = row_batch(pairs.rollout, torch.arange(start, end))
        logp = completion_logprobs(model, ids, attn, cmask, temperature=temperature)  # (b, Tc)
        seq = dpo.sequence_logprobs(logp, loss_mask[rows, : cmask.shape[1]].to(logp.device))  # (b,)
        here = (pairs.chosen >= start) & (pairs.chosen < end)  # the pairs of these groups
        chosen, rejected = pairs.chosen[here], pairs.rejected[here]  # (p,) each
        loss, stats = dpo.dpo_loss(
            seq[chosen - start],
            seq[rejected - start],
            ref_seq[chosen],
            ref_seq[rejected],
            beta=opts.beta,
            loss=opts.loss,
            label_smoothing=opts.label_smoothing,
            num_pairs=num_pairs,
        )
        grad_scale.scaled(loss).backward()  # this rank's share: the gradient reduction sums the ranks'
        loss_total += float(loss.detach())
        parts.append(({k: float(v) for k, v in stats.items()}, float(len(chosen))))
    return parts, loss_total


def update(run: Any, batch: Batch) -> dict[str, float]:
    """Online DPO's part of a step (module docstring): pairs, reference pass, update; the metrics.

    dpo/pairs, dpo/ties, dpo/unscored: counts of the whole batch; dpo/accuracy, dpo/margin,
    dpo/logp_chosen, dpo/logp_rejected, dpo/reward_chosen, dpo/reward_rejected: means over its
    pairs (NaN in a step without pairs); loss, grad_norm, lr as GRPO's; time/reference.
    """
    cfg, model, world = run.cfg, run.model, run.world
    assert run.ref_model is not None or cfg.lora.enabled, "online DPO needs the reference (build_run makes it)"
    t0 = time.perf_counter()
    pairs = make_pairs(batch, cfg.grpo.group_size, cfg.dpo.pairs)
    local = {"pairs_sum": len(pairs.chosen), "ties_sum": pairs.ties, "unscored_sum": pairs.unscored}
    counts, _ = merge_stats(world, {k: float(v) for k, v in local.items()}, 1.0)  # the whole batch's
    size, temperature = cfg.train.micro_batch_size, cfg.sampler.temperature
    ref_logp = reference_pass(model, run.ref_model, pairs.rollout, size, temperature, world=world)  # (n, Tc)
    ref_seq = dpo.sequence_logprobs(ref_logp, pairs.rollout.loss_mask.to(ref_logp.device))  # (n,)
    t1 = time.perf_counter()

    parts: list[tuple[dict[str, float], float]] = []
    losses, grad_norms, lrs = [], [], []
    for _ in range(cfg.grpo.num_iterations):
        step_parts, loss = pair_backward(
            model,
            pairs,
            ref_seq,
            cfg.dpo,
            size=size,
            temperature=temperature,
            num_pairs=int(counts["pairs_sum"]),
            world=world,
            grad_scale=run.grad_scale,
        )
        parts += step_parts
        grad_norm, lr = optimizer_step(cfg, model, run.optimizer, run.scheduler, world, run.grad_scale)
        grad_norms.append(grad_norm)
        lrs.append(lr)
        losses.append(loss)  # this rank's share of the mean over all pairs
    stats, _ = merge_stats(world, *combine_stats(parts))
    loss = merge_stats(world, {"loss_sum": sum(losses) / len(losses)}, 1.0)[0]["loss_sum"]
    out = {f"dpo/{k}": stats.get(k, math.nan) for k in PAIR_STATS}
    out.update({f"dpo/{k.removesuffix('_sum')}": v for k, v in counts.items()})
    out.update({"loss": loss, "grad_norm": sum(grad_norms) / len(grad_norms), "lr": sum(lrs) / len(lrs)})
    return {**out, "time/reference": t1 - t0, **grad_scale_metrics(run.grad_scale)}
