"""The numbers a step logs, to the bit they deserve: rewards kept in fp64 from the reward functions to the
metrics and the advantages' inputs, extremes with a NaN that do not depend on the order of the parts merged, and
the mean IS weight of the tokens whose weight is known whatever the micro-batch split."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from helpers.rollouts import full_rollout
from helpers.tiny import tiny_model, tiny_tokenizer

from minigrpo import rewards, step
from minigrpo.advantages import group_advantages
from minigrpo.config import load_config
from minigrpo.data import Example, PromptLoader
from minigrpo.distributed import World, combine_stats, gather_rows
from minigrpo.grpo import LossOptions, make_normalizer, policy_loss
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout, left_pad, logprob_mismatch
from minigrpo.update_loss import policy_token_loss

NAN = float("nan")


class ShortSampler:
    """Every completion 2 tokens long; the text is the row's index, so a reward can tell rows apart."""

    pad_id = 0

    def generate(self, prompt_ids, params, *, key, row_ids):
        n = len(prompt_ids) * params.n
        ids, mask = left_pad(prompt_ids, self.pad_id)  # (B, Tp)
        return Rollout(
            prompt_ids=ids.repeat_interleave(params.n, 0),
            prompt_mask=mask.repeat_interleave(params.n, 0),
            completion_ids=torch.full((n, 2), 5),
            completion_mask=torch.ones(n, 2, dtype=torch.long),
            sampler_logp=torch.zeros(n, 2),
            truncated=torch.zeros(n, dtype=torch.bool),
            completion_texts=[str(i) for i in row_ids],
            prompt_index=torch.arange(len(prompt_ids)).repeat_interleave(params.n),
            group_size=params.n,
            stats={"tokens": float(n * 2), "total_s": 1.0},
        )


def tenth(prompts, completions, answers, **_):
    return [0.1] * len(completions)


def parity(prompts, completions, answers, **_):
    return [float(int(c) % 2) for c in completions]


def test_a_reward_of_a_tenth_is_logged_as_a_tenth_and_the_advantages_keep_their_fp32_values():
    """Rewards 0.1 (every row) + parity 0, 1, 0, 1: reward/tenth logged 0.10000000149011612 (the fp32 rounding of
    0.1), reward_max 1.100000023841858; now 0.1 and 1.1 exactly. The advantages come from the fp64 totals and
    equal those of the fp32 totals to fp32 precision (the loss casts them to its dtype)."""
    cfg = load_config(
        None, ["run.device=cpu", "grpo.prompts_per_step=2", "grpo.group_size=2", "train.micro_batch_size=4"]
    )
    loader = PromptLoader([Example(prompt=f"repeat {d}", answer=str(d), columns={}) for d in range(4)], shuffle=False)
    specs = [rewards.RewardSpec(fn.__name__, fn=fn, timeout_s=None) for fn in (tenth, parity)]
    params = SamplingParams(n=2, max_new_tokens=2)
    batch = step.rollout_phase(cfg, loader, ShortSampler(), tiny_tokenizer(), specs, params, step=0)
    m = batch.reward_metrics
    assert m["reward/tenth"] == 0.1 and m["reward/parity"] == 0.5
    assert m["reward_min"] == 0.1 and m["reward_max"] == 1.1
    assert m["reward"] == pytest.approx(0.6, rel=1e-15)  # fp32 totals: 0.600000012665987
    assert m["reward_std"] == pytest.approx(math.sqrt(1 / 3), rel=1e-15)
    totals = torch.tensor([0.1, 1.1, 0.1, 1.1], dtype=torch.float64)
    assert batch.rewards.dtype == torch.float64 and batch.rewards.tolist() == totals.tolist()
    assert torch.equal(batch.advantages, group_advantages(totals, 2))
    old = group_advantages(totals.float(), 2)  # (N,) fp32: from the totals rounded to fp32 first
    torch.testing.assert_close(batch.advantages.float(), old, rtol=1.2e-7, atol=0.0)


def test_fp64_advantages_give_the_loss_of_their_fp32_rounding():
    """policy_loss and the fused path's per-token terms take the advantages in the loss's dtype: fp64
    advantages make the same fp32 loss, bit for bit, as the same advantages rounded to fp32."""
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(4, 3, generator=g), -torch.rand(4, 3, generator=g)  # (N, Tc) fp32
    A = torch.tensor([0.1, -0.3, 0.7, -0.5], dtype=torch.float64)
    mask, opts = torch.ones(4, 3), LossOptions(loss_type="dapo")
    loss64, stats64 = policy_loss(logp, old, A, mask, opts)
    loss32, stats32 = policy_loss(logp, old, A.float(), mask, opts)
    assert loss64.dtype == torch.float32 and torch.equal(loss64, loss32) and stats64 == stats32
    terms = [policy_token_loss(mask.bool(), mask, a, opts, make_normalizer(mask), old_logp=old) for a in (A, A.float())]
    assert torch.equal(terms[0](logp.flatten(), 0, 12), terms[1](logp.flatten(), 0, 12))


def test_score_keeps_fp64():
    """score()'s per-function scores and totals are fp64: a weight of 0.3 times a reward of 0.1 is 0.03
    in fp64 (it was 0.029999999329447746, the fp32 rounding)."""
    res = rewards.score(["p"], ["c"], ["a"], [rewards.RewardSpec("tenth", fn=tenth, weight=0.3, timeout_s=None)])
    assert res.per_fn.dtype == res.total.dtype == torch.float64
    assert res.per_fn.item() == 0.1 and res.total.item() == 0.1 * 0.3
    assert res.metrics()["reward/tenth"] == 0.1 and res.metrics()["reward/total"] == 0.1 * 0.3


@dataclasses.dataclass(frozen=True)
class TwoRanks(World):
    """Rank 0 of 2 whose all_gather gets `other` from rank 1 (no process group)."""

    other: object = None

    def all_gather(self, obj):
        return [obj, self.other]


def test_gather_rows_keeps_fp64_rows_and_turns_other_dtypes_to_fp32():
    """The rows of every rank gathered: fp64 rewards stay fp64 (they were rounded to fp32: 0.1 came back as
    0.10000000149011612); integer counts become fp32 as before."""
    mine, theirs = torch.tensor([0.1, NAN], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    rows, start = gather_rows(TwoRanks(rank=0, size=2, other=theirs), mine)
    assert start == 0 and rows.dtype == torch.float64
    assert rows[0].item() == 0.1 and rows[1].isnan() and rows[2].item() == 0.7
    counts, _ = gather_rows(TwoRanks(rank=0, size=2, other=torch.tensor([3])), torch.tensor([1, 2]))
    assert counts.dtype == torch.float32 and counts.tolist() == [1.0, 2.0, 3.0]


def test_extremes_with_a_nan_part_are_nan_in_every_order_of_the_parts():
    """combine_stats's *_min / *_max took Python's min/max: min(nan, 1) is nan but min(1, nan) is 1, so a NaN
    sampler log-prob's logp_diff_max depended on which rank or micro-batch came first. A NaN now propagates (as
    torch.max), and without one the extremes are the plain ones."""
    sampler = torch.tensor([[-1.0, -2.0], [NAN, -0.5], [-0.3, -0.1]])  # (N, Tc): row 1 has a NaN log-prob
    trainer = torch.tensor([[-1.5, -2.0], [-1.0, -0.4], [-0.3, -1.1]])
    mask = torch.ones(3, 2)
    parts = [(logprob_mismatch(sampler[i : i + 1], trainer[i : i + 1], mask[i : i + 1]), 2.0) for i in range(3)]
    for order in itertools.permutations(parts):
        merged, total = combine_stats(order)
        assert total == 6.0
        for key in ("logp_diff_max", "is_ratio_min", "is_ratio_max"):
            assert math.isnan(merged[key]), (key, merged)
    clean = [parts[0], parts[2]]
    for order in itertools.permutations(clean):
        merged, _ = combine_stats(order)
        assert merged["logp_diff_max"] == pytest.approx(1.0, rel=1e-6)
        assert merged["is_ratio_min"] == pytest.approx(math.exp(-1.0), rel=1e-6)
        assert merged["is_ratio_max"] == 1.0


def is_weight_stats(mode: str, size: int, unknown_rows: tuple[int, ...] = (4,)) -> dict[str, float]:
    """The IS-weight stats of one update step on 2 x 3 rows whose sampler log-probs hold NaNs (one token of row 1,
    every token of `unknown_rows`), in micro-batches of `size` rows (SGD on a fresh tiny model: every split starts
    from the same weights)."""
    g = torch.Generator().manual_seed(5)
    rollout = full_rollout(2, 3, 4, 5, 128, g)
    rollout.sampler_logp = -4.8 + 0.3 * torch.randn(6, 5, generator=g)  # (N, Tc) near the tiny model's
    rollout.sampler_logp[1, 2] = NAN
    rollout.sampler_logp[list(unknown_rows)] = NAN
    adv = torch.randn(6, generator=g)
    batch = step.Batch(rollout, rewards=adv, advantages=adv, reward_metrics={}, prompts=[], answers=[])
    cfg = load_config(
        None,
        ["run.device=cpu", "grpo.prompts_per_step=2", "grpo.group_size=3", f"train.micro_batch_size={size}",
         "sampler.max_new_tokens=5", f"grpo.is_correction={mode}", "grpo.is_cap=1e6"],
    )  # fmt: skip
    model = tiny_model(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = step.update_phase(cfg, model, optimizer, scheduler, batch, None, None)
    return {k: v for k, v in stats.items() if k.startswith("is_")}


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_truncate"])
def test_is_weight_stats_do_not_depend_on_the_micro_batch_split(mode):
    """Row 4's sampler log-probs are all NaN (and, per sequence, row 1's weight too). is_weight_mean was each
    micro-batch's mean over its known weights averaged with the weight of ALL its tokens, and a micro-batch with no
    known weight logged min = mean = max = 1: one row per micro-batch gave another mean, min and max than one
    micro-batch of all rows (token: mean 0.8021 vs 0.7309; sequence: mean 0.3554 vs 0.0332, max 1.0 vs 0.0639).
    Now the mean is the step's sum over its count of known weights, and a micro-batch without one adds nothing to
    min / mean / max (the tolerance covers the tiny model's fp32 forward on other batch shapes)."""
    whole = is_weight_stats(mode, 6)
    assert set(whole) == {"is_weight_min", "is_weight_mean", "is_weight_max", "is_clip_frac"}, whole
    if mode.startswith("sequence"):  # every known row weight is below 1: a stray 1 would show in the max
        assert whole["is_weight_max"] < 0.1, whole
    for size in (1, 2, 3):
        split = is_weight_stats(mode, size)
        for key, value in whole.items():
            assert split[key] == pytest.approx(value, rel=5e-6), (size, key, split[key], value)


def test_a_step_without_a_known_is_weight_logs_nan_under_the_same_names():
    """Every sampler log-prob NaN: no weight is known, and the step logs is_weight_min / _mean / _max as NaN (not
    1, the value of an empty micro-batch), so the names a step logs do not change."""
    stats = is_weight_stats("token_truncate", 2, unknown_rows=tuple(range(6)))
    assert stats["is_clip_frac"] == 1.0
    assert all(math.isnan(stats[f"is_weight_{k}"]) for k in ("min", "mean", "max")), stats
