"""Fused LM head + policy loss (kernels/policy_head.py through minigrpo/update_loss.py) vs the unfused loss.

The spec is the unfused composition in fp64: log_softmax of the full (n, V) logits at the targets,
scattered into (N, Tc), then grpo.policy_loss (whose elementwise math runs in fp32). Budget as in
the other kernel tests: err(fused) <= 2 * err(the same unfused composition in the input dtype) +
FLOOR[dtype], err = ||out - ref|| / ||ref|| over loss, dH and dW. Both impls: "triton" (the tile
kernels under the CPU interpreter) and "ref" (the blocked torch path), with blocks of a few tokens
so that dW is accumulated across blocks. Every loss type, with padding and a fully masked row,
temperature != 1, clipping that engages (checked through the stats), IS weights per token and per
sequence, and beta > 0. Through the update loop: fused and general updates agree, and with a loss
mask that has holes (multi-turn rows) the fused gradients of a split sum to one micro-batch's.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers.allocations import LargestOutput
from helpers.kernel_checks import (
    DEVICES,
    FLOOR,
    kernel_device,
    near_certain_logits,
    near_certain_tolerance,
    need_interpreter,
    rel_err,
)
from helpers.tiny import tiny_model

from minigrpo import grpo, step, update_loss
from minigrpo.kernels import fused_linear_token_loss, linear_logprobs_ref, linear_token_loss_ref
from minigrpo.kernels import logprobs as logprobs_module
from minigrpo.update_loss import policy_token_loss

LENGTHS = [9, 4, 0, 7, 2, 9]  # completion lengths of N = 6 rows, Tc = 9: padding and an empty row
SCENARIOS = {  # name -> (temperature, LossOptions overrides, old_logp given)
    "on_policy": (1.0, {}, False),
    "off_policy_clip_kl_token_is": (
        0.7,
        dict(epsilon_high=0.28, delta=1.6, beta=0.04, is_correction="token_truncate", is_cap=1.05, is_min=0.97),
        True,
    ),
    "on_policy_token_is_kl": (1.3, dict(beta=0.1, is_correction="token_mask", is_cap=1.05), False),
    "off_policy_sequence_is": (0.9, dict(is_correction="sequence_truncate", is_cap=1.5), True),
}


def _problem(dtype, device, loss_type, scenario, D=48, V=389):
    """Hidden states of the active tokens, the head, and the loss inputs of one micro-batch."""
    T, overrides, with_old = SCENARIOS[scenario]
    N, Tc = len(LENGTHS), max(LENGTHS)
    mask = (torch.arange(Tc, device=device)[None] < torch.tensor(LENGTHS, device=device)[:, None]).float()
    select = mask > 0
    n = int(select.sum())
    h = torch.randn(n, D + 8, dtype=torch.float64, device=device).to(dtype)[:, :D]  # row-strided
    w = (torch.randn(V, D, dtype=torch.float64, device=device) * D**-0.5 * 3).to(dtype)
    tgt = torch.randint(0, V, (n,), device=device)
    logp0 = torch.zeros(N, Tc, device=device).masked_scatter(select, linear_logprobs_ref(h, w, tgt, T)[0].float())
    noise = lambda s: s * torch.randn(N, Tc, device=device) * mask
    old = logp0 + noise(0.3) if with_old else None
    opts = grpo.LossOptions(loss_type=loss_type, max_completion_length=12, **overrides)
    inputs = dict(
        mask=mask,
        advantages=torch.randn(N, device=device),
        opts=opts,
        normalizer=grpo.make_normalizer(mask, loss_type, max_completion_length=12, num_micro_batches=2),
        old_logp=old,
        ref_logp=logp0 + noise(0.2) if opts.beta else None,
        sampler_logp=(logp0 if old is None else old) + noise(0.05) if opts.is_correction else None,
    )
    return h, w, tgt, T, inputs


def _unfused(h, w, tgt, T, inputs):
    """(loss, stats) of grpo.policy_loss on log-probs of the full logits: the spec."""
    select = inputs["mask"] > 0
    logp = linear_logprobs_ref(h, w, tgt, T)[0]  # (n,)
    full = torch.zeros(select.shape, dtype=logp.dtype, device=logp.device).masked_scatter(select, logp)
    kw = {k: inputs[k] for k in ("normalizer", "ref_logp", "sampler_logp")}
    return grpo.policy_loss(full, inputs["old_logp"], inputs["advantages"], inputs["mask"], inputs["opts"], **kw)


def _fused(h, w, tgt, T, inputs, impl, rows):
    select = inputs["mask"] > 0
    keys = ("old_logp", "ref_logp", "sampler_logp")
    token_loss = policy_token_loss(
        select,
        inputs["mask"],
        inputs["advantages"],
        inputs["opts"],
        inputs["normalizer"],
        **{k: inputs[k] for k in keys},
    )
    loss, logp, _ = fused_linear_token_loss(h, w, tgt, token_loss, temperature=T, impl=impl, rows=rows)
    return loss, logp


def _token_terms_abs_sum(h, w, tgt, T, inputs) -> float:
    """sum over tokens of |weighted token loss|: the scale of the summed loss."""
    keys = ("old_logp", "ref_logp", "sampler_logp")
    m = inputs["mask"]
    token_loss = policy_token_loss(
        m > 0, m, inputs["advantages"], inputs["opts"], inputs["normalizer"], **{k: inputs[k] for k in keys}
    )
    logp = linear_logprobs_ref(h, w, tgt, T)[0]
    return float(token_loss(logp, 0, logp.shape[0]).abs().sum())


def _loss_and_grads(fn, h, w):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w)[0]
    loss.backward()
    return [loss.detach(), h.grad, w.grad]


@pytest.fixture
def narrow_blocks(monkeypatch):
    # narrow kernel blocks: the online max / sum loop of a row runs several times in one program
    monkeypatch.setattr(logprobs_module, "_STATS_BLOCK_V", 128)
    monkeypatch.setattr(logprobs_module, "_GRAD_BLOCK_V", 128)


CASES = [  # every loss type in two scenarios, every scenario with two loss types
    ("grpo", "on_policy"),
    ("grpo", "off_policy_clip_kl_token_is"),
    ("bnpo", "on_policy_token_is_kl"),
    ("bnpo", "off_policy_sequence_is"),
    ("dr_grpo", "off_policy_clip_kl_token_is"),
    ("dr_grpo", "on_policy_token_is_kl"),
    ("dapo", "off_policy_sequence_is"),
    ("dapo", "on_policy"),
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize(("loss_type", "scenario"), CASES)
def test_fused_loss_and_grads_match_the_unfused_loss(loss_type, scenario, impl, device, narrow_blocks):
    h, w, tgt, T, inputs = _problem(torch.float32, device, loss_type, scenario)
    ref = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h.double(), w.double())
    plain = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h, w)
    got = _loss_and_grads(functools.partial(_fused, tgt=tgt, T=T, inputs=inputs, impl=impl, rows=5), h, w)
    for name, a, p, r in zip(["dh", "dw"], got[1:], plain[1:], ref[1:]):
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[torch.float32], f"{name}: fused {e_k:.2e} vs unfused fp32 {e_p:.2e}"
    # the loss is a sum of token terms that may cancel: its error is measured against their scale
    terms = _token_terms_abs_sum(h.double(), w.double(), tgt, T, inputs)
    e_k, e_p = (abs(float(x) - float(ref[0])) / terms for x in (got[0], plain[0]))
    assert e_k <= 2 * e_p + FLOOR[torch.float32], f"loss: fused {e_k:.2e} vs unfused fp32 {e_p:.2e} of sum |terms|"
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    # the log-probs handed out for metrics are the kernel's own
    logp = _fused(h, w, tgt, T, inputs, impl, rows=5)[1]
    torch.testing.assert_close(logp.double(), linear_logprobs_ref(h.double(), w.double(), tgt, T)[0], rtol=0, atol=2e-5)
    if scenario.startswith("off_policy_clip"):  # the clipped branches did take part
        stats = _unfused(h.double(), w.double(), tgt, T, inputs)[1]
        assert stats["clip_region_frac"] > 0.1 and stats["is_clip_frac"] > 0.1 and stats["kl"] > 0, stats


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_bf16_within_the_budget_of_unfused_bf16(impl, device, narrow_blocks):
    # on-policy (the ratio is exactly 1: no clip boundary that bf16 rounding could cross), KL and IS
    h, w, tgt, T, inputs = _problem(torch.bfloat16, device, "dapo", "on_policy_token_is_kl", D=96, V=1003)
    ref = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h.double(), w.double())
    plain = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h, w)
    got = _loss_and_grads(functools.partial(_fused, tgt=tgt, T=T, inputs=inputs, impl=impl, rows=8), h, w)
    for name, a, p, r in zip(["loss", "dh", "dw"], got, plain, ref):
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[torch.bfloat16], f"{name}: fused {e_k:.2e} vs unfused bf16 {e_p:.2e}"
    assert got[1].dtype == got[2].dtype == torch.bfloat16


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_generic_token_loss_matches_its_spec(impl, narrow_blocks):
    # any elementwise loss, against linear_token_loss_ref in fp64; one block per token
    if impl == "triton":
        need_interpreter()
    n, D, V = 7, 32, 257
    h, w = torch.randn(n, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64) * 0.3
    tgt = torch.randint(0, V, (n,))
    c = torch.randn(n, dtype=torch.float64)
    token_loss = lambda logp, a, b: c[a:b] * logp + 0.5 * logp.exp()
    ref = _loss_and_grads(lambda a, b: linear_token_loss_ref(a, b, tgt, token_loss, 0.8), h, w)
    got = _loss_and_grads(
        lambda a, b: fused_linear_token_loss(a, b, tgt, token_loss, temperature=0.8, impl=impl, rows=1),
        h.float(),
        w.float(),
    )
    for name, a, r in zip(["loss", "dh", "dw"], got, ref):
        assert rel_err(a, r) < 2e-6, name


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("T", [1.0, 0.9])
def test_near_certain_targets_keep_their_logp_and_gradient(T, impl, device, narrow_blocks):
    # fp32 logits offset by +-30..45, target the max by >= 10.5: logp = -tiny (1e-7..3e-5). Through
    # the logsumexp m + log s (an ulp of 30 is 1.9e-6) logp and 1 - p_target were off by ~1e-6:
    # logp wrong by up to 100% and dH by 12% (torch fp32: 0.6%)
    N, V = 24, 257
    x, tgt = near_certain_logits(N, V, device=device)  # (N, V) fp32: logits of the head I, h = x
    x = x * T  # the same margins after tempering
    eye = torch.eye(V, device=device)
    c = torch.randn(N, dtype=torch.float64, device=device)
    token_loss = lambda logp, a, b: c[a:b].to(logp.dtype) * logp
    spec = lambda a, b: linear_token_loss_ref(a, b, tgt, token_loss, T)
    ref = _loss_and_grads(spec, x.double(), eye.double())
    plain = _loss_and_grads(spec, x, eye)
    got = _loss_and_grads(
        lambda a, b: fused_linear_token_loss(a, b, tgt, token_loss, temperature=T, impl=impl, rows=8), x, eye
    )
    for name, a, p, r in zip(["loss", "dh", "dw"], got, plain, ref):
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[torch.float32], f"{name}: fused {e_k:.2e} vs unfused fp32 {e_p:.2e}"
    logp = fused_linear_token_loss(x, eye, tgt, token_loss, temperature=T, impl=impl, rows=8)[1]
    ref_logp = spec(x.double(), eye.double())[1]
    assert torch.all((logp.double() - ref_logp).abs() <= near_certain_tolerance(ref_logp))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_policy_token_loss_closed_form_equals_autograd_on_its_call(scenario, monkeypatch):
    """PolicyTokenLoss.value_and_grad (one kernel) is its __call__ (grpo's functions) and autograd;
    the fused head takes it (every block), not autograd."""
    h, w, tgt, T, inputs = _problem(torch.float32, kernel_device(), "grpo", scenario)
    m = inputs["mask"]
    keys = ("old_logp", "ref_logp", "sampler_logp")
    token_loss = policy_token_loss(
        m > 0, m, inputs["advantages"], inputs["opts"], inputs["normalizer"], **{k: inputs[k] for k in keys}
    )
    logp = linear_logprobs_ref(h, w, tgt, T)[0].float()
    for start, stop in [(0, logp.shape[0]), (3, 11)]:
        lp = logp[start:stop].clone().requires_grad_()
        want = token_loss(lp, start, stop)
        (want_grad,) = torch.autograd.grad(want.sum(), lp)
        kernel = update_loss.clipped_token_loss_and_grad
        for impl in ("triton", "ref"):
            monkeypatch.setattr(update_loss, "clipped_token_loss_and_grad", functools.partial(kernel, impl=impl))
            got, grad = token_loss.value_and_grad(logp[start:stop], start, stop)
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
        monkeypatch.setattr(update_loss, "clipped_token_loss_and_grad", kernel)
    calls, closed_form = [], update_loss.PolicyTokenLoss.value_and_grad

    def counted(self, logp, start, stop):
        calls.append((start, stop))
        return closed_form(self, logp, start, stop)

    monkeypatch.setattr(update_loss.PolicyTokenLoss, "value_and_grad", counted)
    _loss_and_grads(functools.partial(_fused, tgt=tgt, T=T, inputs=inputs, impl="ref", rows=4), h, w)
    n = logp.shape[0]
    assert calls == [(a, min(a + 4, n)) for a in range(0, n, 4)]


def test_backward_scales_by_the_incoming_gradient_and_runs_once():
    h, w, tgt, T, inputs = _problem(torch.float32, torch.device("cpu"), "grpo", "off_policy_clip_kl_token_is")
    base = _loss_and_grads(functools.partial(_fused, tgt=tgt, T=T, inputs=inputs, impl="ref", rows=4), h, w)
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = _fused(h, w, tgt, T, inputs, "ref", 4)[0]
    (-2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, -2.5 * base[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, -2.5 * base[2], rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_frozen_head_and_no_grad():
    h, w, tgt, T, inputs = _problem(torch.float32, torch.device("cpu"), "dapo", "on_policy")
    ref = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h.double(), w.double())
    hg = h.detach().clone().requires_grad_()
    loss = _fused(hg, w, tgt, T, inputs, "ref", 3)[0]  # the head frozen, as under LoRA
    (dh,) = torch.autograd.grad(loss, hg)
    assert rel_err(dh, ref[1]) < 1e-5
    with torch.no_grad():
        again = _fused(hg, w, tgt, T, inputs, "ref", 3)[0]
    assert not again.requires_grad and rel_err(again, ref[0]) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_never_allocates_full_logits(impl):
    if impl == "triton":
        need_interpreter()
    n, D, V, rows = 128, 16, 1003, 16
    h = torch.randn(n, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    tgt = torch.randint(0, V, (n,))
    with LargestOutput() as rec:
        loss = fused_linear_token_loss(h, w, tgt, lambda lp, a, b: -lp, impl=impl, rows=rows)[0]
        loss.backward()
    assert rec.nbytes <= rows * V * 4, f"{rec.op} made {rec.nbytes} B; a block of logits is {rows * V * 4} B"
    with LargestOutput() as plain:
        linear_token_loss_ref(h, w, tgt, lambda lp, a, b: -lp)[0].backward()
    assert plain.nbytes >= n * V * 4  # the recorder does see the spec's (n, V) logits


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_no_selected_tokens(impl):
    # a micro-batch whose loss mask selects nothing: zero loss, empty dH, zero dW
    if impl == "triton":
        need_interpreter()
    h = torch.zeros(0, 32, requires_grad=True)
    w = torch.randn(101, 32, requires_grad=True)
    loss, logp, _ = fused_linear_token_loss(h, w, torch.zeros(0, dtype=torch.long), lambda lp, a, b: -lp, impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0 and logp.shape == (0,) and h.grad.shape == (0, 32)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_auto_is_ref_on_cpu():
    h, w, tgt, T, inputs = _problem(torch.float32, torch.device("cpu"), "bnpo", "on_policy_token_is_kl")
    a, b = (_fused(h, w, tgt, T, inputs, impl, None) for impl in ("auto", "ref"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# the update phase: the fused path takes the loss whenever it is a sum of per-token terms


def test_tokenwise_losses_only():
    token = grpo.LossOptions(loss_type="grpo", beta=0.1, delta=2.0, is_correction="token_mask")
    assert grpo.is_tokenwise(token, old_logp_given=False)
    assert not grpo.is_tokenwise(grpo.LossOptions(importance_sampling_level="sequence"), old_logp_given=True)
    seq_is = grpo.LossOptions(is_correction="sequence_mask")
    assert grpo.is_tokenwise(seq_is, old_logp_given=True) and not grpo.is_tokenwise(seq_is, old_logp_given=False)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="per-token"):
        policy_token_loss(mask > 0, mask, torch.zeros(2), seq_is, grpo.make_normalizer(mask), sampler_logp=mask)


def _rollout(N, Tp, Tc, V, generator):
    from minigrpo.sampling.rollout import Rollout

    lengths = torch.randint(1, Tc + 1, (N,), generator=generator)
    lengths[0] = Tc
    cmask = (torch.arange(Tc)[None] < lengths[:, None]).long()
    pmask = torch.ones(N, Tp, dtype=torch.long)
    pmask[1, :3] = 0  # a left-padded prompt
    return Rollout(
        prompt_ids=torch.randint(3, V, (N, Tp), generator=generator),
        prompt_mask=pmask,
        completion_ids=torch.randint(3, V, (N, Tc), generator=generator) * cmask,
        completion_mask=cmask,
        sampler_logp=torch.zeros(N, Tc),
        truncated=lengths == Tc,
        completion_texts=[""] * N,
        prompt_index=torch.arange(N // 4).repeat_interleave(4),
        group_size=4,
    )


def _update(model, cfg, batch, old_logp, ref_logp):
    """One update_phase with plain SGD: (parameter change, stats)."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    stats = step.update_phase(cfg, model, optimizer, scheduler, batch, old_logp, ref_logp)
    return [p.detach() - b for p, b in zip(model.parameters(), before)], stats


@pytest.mark.parametrize(
    "overrides",
    [
        ["grpo.loss_type=dapo", "grpo.num_iterations=2", "grpo.beta=0.05", "grpo.is_correction=token_truncate"],
        ["grpo.loss_type=grpo", "grpo.mask_truncated_completions=true", "grpo.delta=1.5"],
        ["grpo.loss_type=bnpo", "grpo.num_iterations=2", "grpo.is_correction=sequence_mask", "grpo.is_cap=1.2"],
        ["grpo.loss_type=dr_grpo", "grpo.beta=0.02", "grpo.epsilon_high=0.28"],
    ],
    ids=["dapo_mu2_kl_is", "grpo_masked_truncated", "bnpo_mu2_sequence_is", "dr_grpo_kl"],
)
def test_update_phase_fused_equals_general(overrides, monkeypatch):
    from minigrpo.config import load_config
    from minigrpo.step import Batch, logprobs_phase

    B, G, Tp, Tc, V = 2, 4, 6, 10, 128
    cfg = load_config(
        None,
        ["run.device=cpu", f"grpo.prompts_per_step={B}", f"grpo.group_size={G}", "train.micro_batch_size=2",
         f"sampler.max_new_tokens={Tc}", "sampler.temperature=0.8", "train.max_grad_norm=1000", *overrides],
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    model = tiny_model(seed=3)
    rollout = _rollout(B * G, Tp, Tc, V, g)
    on_policy = logprobs_phase(model, rollout, 2, 0.8)  # (N, Tc)
    rollout.sampler_logp = on_policy + 0.05 * torch.randn(on_policy.shape, generator=g) * rollout.completion_mask
    need_old = cfg.grpo.num_iterations > 1 or cfg.grpo.is_correction is not None
    old_logp = on_policy if need_old else None
    ref_logp = on_policy + 0.1 * torch.randn(on_policy.shape, generator=g) if cfg.grpo.beta else None
    adv = torch.randn(B * G, generator=g)
    batch = Batch(rollout, rewards=adv, advantages=adv, reward_metrics={}, prompts=[], answers=[])

    calls = []
    real = update_loss.fused_linear_token_loss
    monkeypatch.setattr(update_loss, "fused_linear_token_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused_delta, fused_stats = _update(copy.deepcopy(model), cfg, batch, old_logp, ref_logp)
    assert len(calls) == 4 * cfg.grpo.num_iterations  # 8 rows in micro-batches of 2
    general = update_loss.micro_batch_loss
    monkeypatch.setattr(step, "micro_batch_loss", lambda *a, **k: general(*a, **{**k, "fused": False}))
    general_delta, general_stats = _update(copy.deepcopy(model), cfg, batch, old_logp, ref_logp)
    assert len(calls) == 4 * cfg.grpo.num_iterations  # the general path never called the fused kernel

    scale = max(float(d.abs().max()) for d in general_delta)
    assert scale > 1e-3, "the update moved nothing"
    diff = max(float((a - b).abs().max()) for a, b in zip(fused_delta, general_delta))
    assert diff <= 1e-5 * scale, f"parameter updates differ by {diff:.2e} (largest change {scale:.2e})"
    assert fused_stats.keys() == general_stats.keys()
    for key, value in general_stats.items():
        assert abs(fused_stats[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, fused_stats[key], value)
    if cfg.grpo.num_iterations > 1:  # the second pass was off-policy: clipping engaged
        assert general_stats["clip_region_frac"] > 0, general_stats


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_with_loss_mask_holes_sum_to_the_whole_batch(loss_type):
    """Multi-turn rows: the loss mask has holes inside the completion mask (environment tokens,
    attended but not trained; the fused path leaves them out of the head), and one micro-batch has
    no loss token at all. With the step's normaliser fixed, the fused gradients summed over a split
    equal those of one micro-batch of all rows, and the general path's."""
    N, Tp, Tc, T = 6, 4, 7, 0.8
    model = tiny_model(seed=3).train()
    V = model.output_weight.shape[0]
    cmask = (torch.arange(Tc)[None] < torch.tensor([7, 3, 5, 2, 6, 1])[:, None]).long()  # (N, Tc)
    mask = cmask * (torch.rand(N, Tc) > 0.3).float()
    mask[2:4] = 0.0  # the micro-batch of rows 2 and 3 trains on nothing
    ids = torch.cat([torch.randint(3, V, (N, Tp)), torch.randint(3, V, (N, Tc)) * cmask], dim=1)
    attn = torch.cat([torch.ones(N, Tp, dtype=torch.long), cmask], dim=1)
    with torch.no_grad():
        logp = update_loss.completion_logprobs(model, ids, attn, cmask, temperature=T)  # (N, Tc)
    noise = lambda s: s * torch.randn(N, Tc) * cmask
    old = logp + noise(0.3)  # off-policy: the clip range engages
    inputs = dict(old_logp=old, ref_logp=logp + noise(0.2), sampler_logp=old + noise(0.05))
    opts = grpo.LossOptions(loss_type=loss_type, epsilon_high=0.28, beta=0.05, is_correction="token_truncate",
                            is_cap=1.02, max_completion_length=10)  # fmt: skip
    assert grpo.is_tokenwise(opts, old_logp_given=True)
    normalizer = grpo.make_normalizer(mask, loss_type, max_completion_length=10, num_micro_batches=3)

    def summed_grads(splits, fused):
        m = copy.deepcopy(model)
        for rows in splits:
            loss, _ = update_loss.micro_batch_loss(
                m, ids[rows], attn[rows], cmask[rows], mask[rows], torch.linspace(-1, 1, N)[rows], opts, normalizer,
                **{k: v[rows] for k, v in inputs.items()}, temperature=T, fused=fused,
            )  # fmt: skip
            loss.backward()
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in m.parameters()])

    splits = [torch.arange(0, 2), torch.arange(2, 4), torch.arange(4, 6)]
    split, whole = summed_grads(splits, True), summed_grads([torch.arange(N)], True)
    general = summed_grads(splits, False)
    scale = float(general.abs().max())
    assert scale > 1e-4
    for name, other in (("one micro-batch", whole), ("general path", general)):
        diff = float((split - other).abs().max())
        assert diff <= 1e-5 * scale, f"fused split vs {name}: {diff:.2e} (largest gradient {scale:.2e})"
    assert not summed_grads(splits[1:2], True).any()  # the masked micro-batch passes no gradient


@pytest.mark.gpu
def test_qwen_head_bf16_cuda():
    # Qwen2.5-1.5B's head in bf16 over several blocks of the default plan, on-policy with KL and token IS,
    # against fp64; its extra memory is the new gradients plus one block of whole rows of logits
    from minigrpo.kernels.policy_head import plan_rows

    dev = torch.device("cuda")
    N, D, V, T = 4096 + 37, 1536, 151936, 0.9
    h = torch.randn(N, D, device=dev).to(torch.bfloat16)
    w = (torch.randn(V, D, device=dev) * D**-0.5 * 3).to(torch.bfloat16)
    tgt = torch.randint(0, V, (N,), device=dev)
    mask = torch.ones(1, N, device=dev)
    logp0 = linear_logprobs_ref(h, w, tgt, T)[0].view(1, N)
    opts = grpo.LossOptions(beta=0.04, is_correction="token_truncate", is_cap=1.05)
    inputs = dict(mask=mask, advantages=torch.ones(1, device=dev), opts=opts, normalizer=grpo.make_normalizer(mask),
                  old_logp=None, ref_logp=logp0 + 0.2 * torch.randn_like(logp0),
                  sampler_logp=logp0 + 0.05 * torch.randn_like(logp0))  # fmt: skip
    ref = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h.double(), w.double())
    plain = _loss_and_grads(functools.partial(_unfused, tgt=tgt, T=T, inputs=inputs), h, w)
    got = _loss_and_grads(functools.partial(_fused, tgt=tgt, T=T, inputs=inputs, impl="triton", rows=None), h, w)
    for name, a, p, r in zip(["loss", "dh", "dw"], got, plain, ref):
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[torch.bfloat16], f"{name}: fused {e_k:.2e} vs unfused bf16 {e_p:.2e}"
    h, w = h.requires_grad_(), w.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _fused(h, w, tgt, T, inputs, "triton", None)[0].backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = (N + V) * D * 2 + plan_rows(N, V, dev) * V * 2 + 32 * 2**20
    assert extra <= budget, f"extra {extra / 2**30:.3f} GiB vs budget {budget / 2**30:.3f} GiB"
