"""Corners of the update's inputs: an fp64 model through the log-probs and the policy loss, and data
columns that would collide with the reward functions' own arguments."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo import grpo
from minigrpo.data import Example
from minigrpo.datafiles import DataError
from minigrpo.logprobs import completion_logprobs
from minigrpo.loop_columns import refuse_loop_columns
from minigrpo.update_loss import micro_batch_loss

LENGTHS = [5, 2, 0, 4]  # completion lengths, Tc = 5: padding and an empty row


def _fp64_batch(Tp: int = 3):
    """A tiny fp64 model and one micro-batch: full prompts, right-padded completions."""
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float64).train()
    N, Tc = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(3, 100, (N, Tp + Tc))
    cmask = (torch.arange(Tc)[None] < torch.tensor(LENGTHS)[:, None]).long()  # (N, Tc)
    attn = torch.cat([torch.ones(N, Tp, dtype=torch.long), cmask], dim=1)  # (N, Tp + Tc)
    return model, ids, attn, cmask


def _reference_logprobs(model, ids, attn, Tc: int) -> torch.Tensor:
    """(N, Tc) fp64 log_softmax of the full logits: column Tp + t - 1 predicts completion token t."""
    hidden = model.hidden(ids, attention_mask=attn)  # (N, T, D) fp64
    logits = hidden[:, -Tc - 1 : -1] @ model.output_weight.T  # (N, Tc, V) fp64
    return logits.log_softmax(-1).gather(-1, ids[:, -Tc:, None])[..., 0]  # (N, Tc)


def _dapo_k3_reference(logp, old, ref, A, m, epsilon, epsilon_high, beta):
    """The dapo loss with k3 KL straight from the formulas: sum(m * l) / sum(m)."""
    rho = torch.exp((logp - old) * m)
    pg = -torch.minimum(rho * A[:, None], rho.clamp(1 - epsilon, 1 + epsilon_high) * A[:, None])
    x = (ref - logp) * m
    return ((pg + beta * (torch.exp(x) - x - 1)) * m).sum() / m.sum()


def test_an_fp64_model_gives_fp64_logprobs():
    """The kernels return fp64 for an fp64 model; the (N, Tc) scatter used to be fp32 and refused them."""
    model, ids, attn, cmask = _fp64_batch()
    logp = completion_logprobs(model, ids, attn, cmask)
    with torch.no_grad():
        want = _reference_logprobs(model, ids, attn, cmask.shape[1]) * cmask
    assert logp.dtype == torch.float64
    assert (logp - want).abs().max().item() <= 1e-12


def test_an_fp64_update_loss_equals_the_formula_in_fp64():
    """Loss, LM-head gradient and stats of an off-policy dapo micro-batch with k3 KL, to 1e-10."""
    model, ids, attn, cmask = _fp64_batch()
    m = cmask.double()
    with torch.no_grad():
        logp0 = _reference_logprobs(model, ids, attn, cmask.shape[1])
    g = torch.Generator().manual_seed(1)
    old = logp0 + 0.3 * torch.randn(logp0.shape, generator=g, dtype=torch.float64) * m  # clipping engages
    ref = logp0 + 0.2 * torch.randn(logp0.shape, generator=g, dtype=torch.float64) * m
    A = torch.tensor([1.0, -0.5, 0.3, -1.2], dtype=torch.float64)
    opts = grpo.LossOptions("dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04)
    loss, stats = micro_batch_loss(
        model, ids, attn, cmask, m, A, opts, grpo.make_normalizer(m, "dapo"), old_logp=old, ref_logp=ref
    )
    loss.backward()
    got_grad = model.output_weight.grad.clone()
    model.zero_grad()
    want = _dapo_k3_reference(_reference_logprobs(model, ids, attn, cmask.shape[1]), old, ref, A, m, 0.2, 0.28, 0.04)
    want.backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want.item()) <= 1e-10, (loss.item(), want.item())
    assert (got_grad - model.output_weight.grad).abs().max().item() <= 1e-10
    rho = torch.exp((logp0 - old) * m)[m > 0]
    low = ((rho < 0.8) & (A[:, None].expand_as(m)[m > 0] < 0)).double().mean()
    assert abs(stats["clip_low_frac"].item() - low.item()) <= 1e-6 and low > 0


@pytest.mark.parametrize("column", ["prompts", "completions", "answers"])
def test_a_data_column_named_like_a_reward_argument_is_refused(column):
    """fn(prompts, completions, answers, **columns) would get two values for the argument at the first
    scoring, after the weights load; the data check refuses the column instead."""
    rows = [Example("q", "1", {column: "x"})]
    for episodes in (False, True):
        with pytest.raises(DataError, match=rf"^data.jsonl: field {column!r} has the name of a column the"):
            refuse_loop_columns(rows, "data.jsonl", episodes=episodes)
