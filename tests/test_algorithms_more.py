"""PPO and online DPO on inputs the other tests leave out: the clipped value loss's clip share for
values that moved inside the clip range (fp32 rounding must not flag them), a whole PPO update
against an fp64 reference written row by row from the formulas (GAE over rows with holes, unscored
rows, several epochs and mini-batches), and GRPO's importance-weight bounds refused under the other
algorithms instead of silently ignored."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_ppo import ppo_setup

from minigrpo.algorithms.ppo import mini_batch_rows, ppo_update
from minigrpo.algorithms.ppo_math import clipped_value_loss
from minigrpo.config import ConfigError, load_config
from minigrpo.step import logprobs_phase

# ================================================================================================
# the clipped value loss in fp32


def moved_values(seed: int = 0, spread: float = 0.07, N: int = 64, Tc: int = 32):
    """fp32 old values near 0 (a young critic's), new values of a later pass (computed, not old + a
    step: their difference rounds), returns, and the mask of the tokens that moved by less than 0.19."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(N, Tc, generator=g) * 0.1  # (N, Tc)
    values = old * 0.9 + torch.randn(N, Tc, generator=g) * spread  # (N, Tc)
    returns = torch.randn(N, Tc, generator=g)
    inside = ((values - old).abs() < 0.19).float()
    return old, values, returns, inside


def test_values_moved_inside_the_clip_range_are_never_counted_as_clipped():
    """Every value within 0.19 of its old value, c = 0.2: the clipped value is the value itself, so
    value_clip_frac is 0 and the loss and its gradient are the plain 0.5 (V - R)^2 ones (fp64
    reference, 1e-6). V_old + clip(V - V_old) rounds in fp32 and flagged 0.7% of them."""
    old, values, returns, inside = moved_values()
    assert 1900 < inside.sum() < inside.numel(), "the case needs tokens on both sides of the range"
    v = values.clone().requires_grad_()
    loss, stats = clipped_value_loss(v, old, returns, inside, 0.2)
    loss.backward()
    n = float(inside.sum())
    want = (0.5 * (values.double() - returns.double()).square() * inside).sum() / n
    assert float(stats["value_clip_frac"]) == 0.0
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    want_grad = (values.double() - returns.double()) * inside / n
    assert torch.allclose(v.grad.double(), want_grad, rtol=0, atol=1e-6)


def test_value_clip_frac_counts_exactly_the_tokens_whose_clipped_error_is_larger():
    """All tokens, some moved past the range: the share is that of an fp64 reference token by token."""
    old, values, returns, _ = moved_values(seed=1, spread=0.3)
    mask = torch.ones_like(old)
    _, stats = clipped_value_loss(values, old, returns, mask, 0.2)
    count = 0
    for v, v0, r in zip(values.flatten().tolist(), old.flatten().tolist(), returns.flatten().tolist()):
        clipped = v0 + min(max(v - v0, -0.2), 0.2)  # Python floats: exact for these fp32 inputs
        count += (clipped - r) ** 2 > (v - r) ** 2
    assert count > 0
    assert float(stats["value_clip_frac"]) == pytest.approx(count / mask.numel(), abs=1e-7)


# ================================================================================================
# a whole PPO update against a reference


def row_pass(model, rollout, i, temperature, critic=False):
    """Log-probs (or critic values) of row i's completion tokens, the row alone without padding."""
    p = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
    n = int(rollout.completion_mask[i].sum())
    c = rollout.completion_ids[i, :n]
    ids = torch.cat([p, c])[None]  # (1, T_i)
    cols = torch.arange(len(p) - 1, len(p) - 1 + n)  # the states before each completion token
    if critic:
        hidden = model.hidden(ids, torch.ones_like(ids))[0]  # (T_i, D)
        return hidden[cols].double() @ model.head.weight[0].double()  # (n,)
    logp = torch.log_softmax(model(ids)[0].double() / temperature, -1)  # (T_i, V)
    return logp[cols, c]  # (n,)


def reference_update(cfg, policy, critic, batch, old_logp, ref_logp, lr):
    """ppo.epochs x ppo.mini_batches SGD steps of both models on the loss written from the papers:
    rewards -kl_coef * (old - ref) per action plus the score on the last, GAE per row over its
    actions (V = 0 after the last), advantages whitened over every action of the step, the clipped
    policy loss + vf_coef x the clipped value loss, each summed over the mini-batch's actions / their count."""
    p, r = cfg.ppo, batch.rollout
    rows = {}
    with torch.no_grad():
        for i in range(r.num_sequences):
            n = int(r.completion_mask[i].sum())
            acts = r.loss_mask[i, :n].bool()
            if not math.isfinite(float(batch.rewards[i])) or not acts.any():
                continue
            old = old_logp[i, :n][acts].double()
            kl = old - ref_logp[i, :n][acts].double()
            values = row_pass(critic, r, i, 1.0, critic=True)[acts]
            rewards = -p.kl_coef * kl
            rewards[-1] += float(batch.rewards[i])
            adv, running = torch.zeros_like(rewards), 0.0
            for t in range(len(rewards) - 1, -1, -1):
                after = values[t + 1] if t + 1 < len(rewards) else 0.0
                running = rewards[t] + p.gamma * after - values[t] + p.gamma * p.lam * running
                adv[t] = running
            rows[i] = {"acts": acts, "old": old, "values": values, "adv": adv, "returns": adv + values}
    every = torch.cat([row["adv"] for row in rows.values()])
    for row in rows.values():
        row["adv"] = (row["adv"] - every.mean()) / torch.sqrt(every.var(unbiased=False) + 1e-8)
    policy, critic = copy.deepcopy(policy).train(), copy.deepcopy(critic).train()
    steps = 0
    for epoch in range(p.epochs):
        for mini_batch in mini_batch_rows(r.num_sequences, p.mini_batches, (cfg.run.seed, steps, epoch)):
            chosen = [int(i) for i in mini_batch if int(i) in rows]
            tokens = sum(len(rows[i]["adv"]) for i in chosen)
            loss = torch.zeros((), dtype=torch.float64)
            for i in chosen:
                row = rows[i]
                ratio = torch.exp(row_pass(policy, r, i, cfg.sampler.temperature)[row["acts"]] - row["old"])
                A = row["adv"]
                loss = loss - torch.minimum(ratio * A, ratio.clamp(1 - p.clip_eps, 1 + p.clip_eps) * A).sum() / tokens
                V, V0, R = row_pass(critic, r, i, 1.0, critic=True)[row["acts"]], row["values"], row["returns"]
                clipped = V0 + (V - V0).clamp(-p.value_clip, p.value_clip)
                loss = loss + p.vf_coef * 0.5 * torch.maximum((V - R) ** 2, (clipped - R) ** 2).sum() / tokens
            policy.zero_grad(set_to_none=True)
            critic.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for q in [*policy.parameters(), *critic.parameters()]:
                    if q.grad is not None:
                        q -= lr * q.grad
            steps += 1
    return policy, critic


def holes(r) -> None:
    """Environment tokens inside three rows (not the model's actions)."""
    r.loss_mask = r.completion_mask.clone()
    r.loss_mask[0, 1] = r.loss_mask[5, 0] = r.loss_mask[7, 2] = 0


def test_a_ppo_update_equals_the_reference_written_from_the_formulas():
    """gamma 0.9, lambda 0.8, a KL penalty, two epochs over two mini-batches of 8 rows (row 3 unscored,
    holes in three rows), micro-batches of 3, sampling temperature 0.7: the policy and the critic after
    the update equal the fp64 reference's (1e-6); both clips act (the check is not vacuous)."""
    cfg, policy, critic, optimizer, scheduler, batch, _, _ = ppo_setup(3, mini_batches=2, edit=holes)
    with torch.no_grad():
        critic.model.head.weight.mul_(0.05)  # values of order 1, as a trained critic's
    cfg.train.max_grad_norm = None
    cfg.sampler.temperature = 0.7
    settings = {"gamma": 0.9, "lam": 0.8, "value_clip": 0.1, "epochs": 2, "kl_coef": 0.3, "clip_eps": 0.1}
    for key, value in settings.items():
        setattr(cfg.ppo, key, value)
    r = batch.rollout
    old_logp = logprobs_phase(policy, r, 16, 0.7)  # (N, Tc)
    noise = torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(3))
    ref_logp = old_logp + 0.3 * noise * r.loss_mask  # (N, Tc)
    want_policy, want_critic = reference_update(cfg, policy, critic.model, batch, old_logp, ref_logp, lr=0.05)
    stats = ppo_update(cfg, policy, critic, optimizer, scheduler, batch, old_logp, ref_logp)
    for got, want in ((policy, want_policy), (critic.model, want_critic)):
        for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
            assert float((a.detach() - b.detach()).abs().max()) <= 1e-6, name
    assert 0 < stats["ppo/value_clip_frac"] < 1 and 0 < stats["ppo/clip_frac"] < 1


# ================================================================================================
# configs


@pytest.mark.parametrize("algorithm", ["ppo", "online_dpo"])
@pytest.mark.parametrize("setting", ["grpo.is_cap=5", "grpo.is_min=0.5"])
def test_importance_weight_bounds_are_refused_where_no_importance_weight_is_read(algorithm, setting):
    """With vLLM grpo.is_correction is derived (token_truncate), yet PPO and online DPO never weight by
    the sampler's log-probs: its bounds set by hand were accepted without a word."""
    overrides = [f"algorithm={algorithm}", "sampler.kind=vllm", setting]
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=[0-9.]+: GRPO's objective settings are not read"):
        load_config(None, overrides)
    assert load_config(None, ["algorithm=grpo", "sampler.kind=vllm", setting]).grpo.is_correction == "token_truncate"
