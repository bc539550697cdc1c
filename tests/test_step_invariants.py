"""What one GRPO step does between the rollout and the optimizer (minigrpo/step.py), on tiny CPU models:
the sampler statistics of every dynamic-sampling round, old log-probs of grpo.num_iterations > 1 taken
before the first update, and a step's loss and gradient independent of the micro-batch split."""

from __future__ import annotations

import pytest
import torch
from helpers.rollouts import full_rollout
from helpers.tiny import tiny_model, tiny_tokenizer

from minigrpo import rewards, step
from minigrpo.config import load_config
from minigrpo.data import Example, PromptLoader
from minigrpo.distributed import World
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout, left_pad

B, G, TC = 3, 4, 3


class RoundSampler:
    """Every row TC tokens long; round 0 takes 10 s, later rounds 1 s each. The completion text is
    "<round>:<row>", so a reward can tell the rounds apart."""

    pad_id = 0

    def generate(self, prompt_ids, params, *, key, row_ids):
        n = len(prompt_ids) * params.n
        ids, mask = left_pad(prompt_ids, self.pad_id)  # (B, Tp)
        return Rollout(
            prompt_ids=ids.repeat_interleave(params.n, 0),
            prompt_mask=mask.repeat_interleave(params.n, 0),
            completion_ids=torch.full((n, TC), 5),
            completion_mask=torch.ones(n, TC, dtype=torch.long),
            sampler_logp=torch.zeros(n, TC),
            truncated=torch.zeros(n, dtype=torch.bool),
            completion_texts=[f"{key[2]}:{i}" for i in range(n)],
            prompt_index=torch.arange(len(prompt_ids)).repeat_interleave(params.n),
            group_size=params.n,
            stats={"tokens": float(n * TC), "total_s": 10.0 if key[2] == 0 else 1.0},
        )


def flat_first_round(prompts, completions, answers, **_):
    """Round 0: every group's rewards equal (all dropped); later rounds: 0, 1, 0, 1 in every group."""
    return [0.0 if c.startswith("0:") else float(int(c.split(":")[1]) % 2) for c in completions]


def test_tokens_per_s_counts_the_rounds_whose_groups_were_all_dropped():
    """Dynamic sampling drops round 0 whole and trains on round 1: 2 x 36 tokens were sampled in
    10 + 1 s, so tokens_per_s is 72 / 11 (it read 36 / 1 when a dropped round's stats were lost)."""
    cfg = load_config(
        None,
        ["run.device=cpu", f"grpo.prompts_per_step={B}", f"grpo.group_size={G}", "grpo.dynamic_sampling=true",
         "grpo.max_resample_rounds=2", "train.micro_batch_size=4"],
    )  # fmt: skip
    loader = PromptLoader([Example(prompt=f"repeat {d}", answer=str(d), columns={}) for d in range(10)], shuffle=False)
    specs = [rewards.RewardSpec("flat_first_round", fn=flat_first_round, timeout_s=None)]
    params = SamplingParams(n=G, max_new_tokens=TC)
    batch = step.rollout_phase(cfg, loader, RoundSampler(), tiny_tokenizer(), specs, params, step=1)
    assert batch.reward_metrics["sampling_rounds"] == 2.0 and batch.reward_metrics["kept/groups"] == B
    assert batch.rollout.completion_texts == [f"1:{i}" for i in range(B * G)]  # round 1 trained on
    metrics = step.rollout_metrics(World(), batch.rollout, torch.device("cpu"))
    assert metrics["tokens_per_s"] == pytest.approx(2 * B * G * TC / 11.0, rel=1e-9)


def update_params(cfg, batch, old_logp, ref_logp=None):
    """(stats, flat parameters after the step) of update_phase on a fresh tiny model with SGD (lr 0.5);
    old_logp: None, or a function of the model giving them."""
    model = tiny_model(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    old = None if old_logp is None else old_logp(model)
    stats = step.update_phase(cfg, model, optimizer, scheduler, batch, old, ref_logp)
    return stats, torch.cat([p.detach().flatten() for p in model.parameters()])


def small_batch(seed: int = 0) -> step.Batch:
    g = torch.Generator().manual_seed(seed)
    rollout = full_rollout(2, G, 5, 6, 128, g)
    adv = torch.randn(2 * G, generator=g)
    return step.Batch(rollout, rewards=adv, advantages=adv, reward_metrics={}, prompts=[], answers=[])


def test_iterations_without_old_logprobs_take_them_before_the_first_update():
    """grpo.num_iterations=3 and no old log-probs given (a caller of update_phase other than the loop):
    the later passes must still be off-policy against the policy before the first update (ratio away
    from 1, clipped tokens), the same step as with logprobs_phase's old log-probs given (it was a
    silently on-policy step: ratio exactly 1 and no clipping in every pass)."""
    cfg = load_config(
        None,
        ["run.device=cpu", "grpo.prompts_per_step=2", f"grpo.group_size={G}", "train.micro_batch_size=4",
         "sampler.max_new_tokens=6", "grpo.num_iterations=3", "grpo.epsilon=0.05"],
    )  # fmt: skip
    batch = small_batch()
    given, params_given = update_params(cfg, batch, lambda m: step.logprobs_phase(m, batch.rollout, 4, 1.0))
    taken, params_taken = update_params(cfg, batch, None)
    assert given["clip_region_frac"] > 0.1 and given["ratio_max"] > 1.05, given
    for key in ("loss", "grad_norm", "ratio_min", "ratio_max", "clip_region_frac"):
        assert taken[key] == pytest.approx(given[key], rel=1e-6, abs=1e-9), key
    assert torch.equal(params_taken, params_given)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_a_step_does_not_depend_on_the_micro_batch_split(loss_type):
    """Two passes (num_iterations 2) with KL, clip-higher and truncated rows masked: one row per
    micro-batch and all rows in one give the same loss, stats and parameters within 1e-6 (fp32)."""
    batch = small_batch(seed=1)
    batch.rollout.completion_mask[1, 4:] = 0  # rows of different lengths, one of them empty
    batch.rollout.completion_mask[5, :] = 0
    batch.rollout.truncated[0] = True
    results = []
    for size in (1, 2 * G):
        cfg = load_config(
            None,
            ["run.device=cpu", "grpo.prompts_per_step=2", f"grpo.group_size={G}", f"train.micro_batch_size={size}",
             "sampler.max_new_tokens=6", "grpo.num_iterations=2", "grpo.beta=0.1", "grpo.epsilon_high=0.28",
             "grpo.mask_truncated_completions=true", f"grpo.loss_type={loss_type}"],
        )  # fmt: skip
        ref = step.logprobs_phase(tiny_model(seed=4), batch.rollout, 3, 1.0)  # (N, Tc) a different policy
        results.append(update_params(cfg, batch, lambda m, s=size: step.logprobs_phase(m, batch.rollout, s, 1.0), ref))
    (one, p_one), (all_rows, p_all) = results
    for key in ("loss", "grad_norm", "kl", "pg_loss", "clip_region_frac", "ratio_max", "entropy"):
        assert one[key] == pytest.approx(all_rows[key], rel=1e-6, abs=1e-7), (key, one[key], all_rows[key])
    assert float((p_one - p_all).abs().max()) < 1e-6
