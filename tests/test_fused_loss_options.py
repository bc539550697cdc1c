"""Inputs the fused LM-head loss (update_loss.py, kernels/token_loss.py) must refuse, as the general path does.

A loss option the inputs cannot serve is an error on both paths, never a loss without the term it
needs: beta != 0 without reference log-probs, an IS correction without the sampler's, log-probs of
another shape. A temperature is 0 (greedy, scored at 1) or positive: a negative or NaN one is
refused, not scored at 1 as if it were greedy.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo import grpo
from minigrpo.kernels import clipped_token_loss_and_grad
from minigrpo.logprobs import completion_logprobs
from minigrpo.update_loss import micro_batch_loss, policy_token_loss

N, TP, TC = 2, 3, 4


def _batch():
    """A tiny model and one micro-batch: (model, ids (N, Tp + Tc), attention mask, completion mask)."""
    model = tiny_model(seed=3)
    V = model.output_weight.shape[0]
    ids = torch.randint(3, V, (N, TP + TC))
    cmask = torch.ones(N, TC, dtype=torch.long)
    cmask[1, 2:] = 0
    attn = torch.cat([torch.ones(N, TP, dtype=torch.long), cmask], dim=1)
    return model, ids, attn, cmask


@pytest.mark.parametrize("temperature", [-0.7, float("nan")])
@pytest.mark.parametrize("fused", [True, False])
def test_a_negative_or_nan_temperature_is_refused_on_both_paths(temperature, fused):
    model, ids, attn, cmask = _batch()
    with pytest.raises(ValueError, match=r"temperature must be 0 .* or positive"):
        completion_logprobs(model, ids, attn, cmask, temperature=temperature)
    calls = []
    forward = model.hidden
    model.hidden = lambda *a, **k: calls.append(1) or forward(*a, **k)
    opts = grpo.LossOptions(max_completion_length=TC)
    with pytest.raises(ValueError, match=r"temperature must be 0 .* or positive"):
        micro_batch_loss(
            model, ids, attn, cmask, cmask.float(), torch.ones(N), opts, None, temperature=temperature, fused=fused
        )
    assert not calls, "the model ran before the temperature was checked"
    at_one = completion_logprobs(model, ids, attn, cmask, temperature=1.0)  # (N, Tc): 0 (greedy) still scores at 1
    assert torch.equal(completion_logprobs(model, ids, attn, cmask, temperature=0.0), at_one)
    losses = [
        micro_batch_loss(model, ids, attn, cmask, cmask.float(), torch.tensor([1.0, -0.5]), opts, None,
                         old_logp=at_one.detach() + 0.1, temperature=t, fused=fused)[0]
        for t in (0.0, 1.0)
    ]  # fmt: skip
    assert torch.equal(losses[0], losses[1]), losses


def _token_loss_inputs():
    mask = torch.ones(N, TC)
    return dict(select=mask > 0, mask=mask, advantages=torch.tensor([1.0, -1.0]), normalizer=grpo.make_normalizer(mask))


def test_policy_token_loss_refuses_beta_without_reference_logprobs():
    """It used to drop the KL term: the fused loss was the plain policy term while the general path raised."""
    opts = grpo.LossOptions(beta=0.3)
    with pytest.raises(ValueError, match="beta != 0 needs ref_logp"):
        policy_token_loss(opts=opts, **_token_loss_inputs())
    with pytest.raises(ValueError, match="beta != 0 needs ref_logp"):
        micro_batch_loss(*_batch(), torch.ones(N, TC), torch.ones(N), opts, None, fused=True)


def test_policy_token_loss_refuses_an_is_correction_without_sampler_logprobs():
    """It used to fail on None.detach() (on-policy) or deep inside importance_weights (old_logp given)."""
    opts = grpo.LossOptions(is_correction="token_truncate")
    for old in (None, torch.zeros(N, TC)):
        with pytest.raises(ValueError, match="is_correction='token_truncate' needs sampler_logp"):
            policy_token_loss(opts=opts, old_logp=old, **_token_loss_inputs())


@pytest.mark.parametrize("name", ["old_logp", "ref_logp", "sampler_logp"])
def test_policy_token_loss_refuses_logprobs_of_another_shape(name):
    opts = grpo.LossOptions(beta=0.1, is_correction="token_mask")
    given = dict(old_logp=torch.zeros(N, TC), ref_logp=torch.zeros(N, TC), sampler_logp=torch.zeros(N, TC))
    given[name] = torch.zeros(N, TC + 2)  # a step-wide (untrimmed) tensor given for one micro-batch
    with pytest.raises(ValueError, match=rf"{name} must be \(N, Tc\) = \(2, 4\)"):
        policy_token_loss(opts=opts, **given, **_token_loss_inputs())


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_the_token_loss_kernel_refuses_beta_without_reference_logprobs(impl):
    """beta != 0 with no ref_logp used to give the loss without its KL term, silently."""
    logp = -torch.rand(5)
    kw = dict(epsilon=0.2, epsilon_high=0.2, log_ratio_clamp=grpo.LOG_RATIO_CLAMP, impl=impl)
    with pytest.raises(ValueError, match=r"beta=0\.5 needs ref_logp"):
        clipped_token_loss_and_grad(logp, torch.ones(5), torch.ones(5), beta=0.5, **kw)
    loss, grad = clipped_token_loss_and_grad(logp, torch.ones(5), torch.ones(5), beta=0.0, **kw)
    assert torch.equal(loss, -torch.ones(5)) and torch.equal(grad, -torch.ones(5))  # on-policy: -A, d = -A
