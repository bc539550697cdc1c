"""Optimizers and schedules: fp32 master weights for 16-bit models, lr shapes, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.allocations import AllocationTracker
from helpers.tiny import tiny_model

from minigrpo.config import TrainCfg
from minigrpo.memory_parts import step_transient_bytes
from minigrpo.optim import MasterWeights, build_optimizer, build_scheduler, lr_factor, step_buckets


def test_schedules():
    warm = TrainCfg(steps=10, warmup_steps=4, schedule="constant", lr=1.0)
    assert [lr_factor(s, warm, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = TrainCfg(steps=10, schedule="linear", min_lr_ratio=0.1, lr=1.0)
    assert lr_factor(0, lin, 10) == 1.0 and math.isclose(lr_factor(5, lin, 10), 0.55)
    assert math.isclose(lr_factor(10, lin, 10), 0.1)
    cos = TrainCfg(steps=10, schedule="cosine", lr=1.0)
    assert math.isclose(lr_factor(5, cos, 10), 0.5) and math.isclose(lr_factor(10, cos, 10), 0.0, abs_tol=1e-12)


def test_warmup_counts_training_steps_whatever_the_updates_per_step():
    """train.warmup_steps is in training steps, as train.steps: with 4 optimizer updates a step
    (grpo.num_iterations 4), a warmup of 2 steps is 8 updates, and a cosine then spans the rest."""
    cfg = TrainCfg(steps=10, warmup_steps=2, schedule="cosine", lr=1.0)
    factors = [lr_factor(s, cfg, 40, updates_per_step=4) for s in range(41)]
    assert factors[:8] == [(s + 1) / 8 for s in range(8)]
    assert factors[8] == 1.0 and math.isclose(factors[24], 0.5) and math.isclose(factors[40], 0.0, abs_tol=1e-12)
    sched = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, 40, 4)
    assert sched.get_last_lr() == [1 / 8]


def test_master_weights_take_updates_that_bf16_would_round_away():
    model = tiny_model(seed=1, dtype=torch.bfloat16)
    cfg = TrainCfg(lr=1e-5)
    opt = build_optimizer(model.parameters(), cfg)
    assert isinstance(opt, MasterWeights)
    sched = build_scheduler(opt, cfg, 10)
    before = [p.detach().clone() for p in model.parameters()]
    masters_before = [m.detach().clone() for m in opt.masters]
    ids = torch.randint(3, 128, (2, 9))
    for _ in range(3):
        model(ids).float().logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    moved = [(m - m0).abs().max().item() for m, m0 in zip(opt.masters, masters_before)]
    assert min(moved) > 0  # every fp32 master moved ...
    changed = sum(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert changed < len(before)  # ... while most bf16 weights could not represent the change yet
    for p, m in zip(model.parameters(), opt.masters):
        assert torch.equal(p, m.to(torch.bfloat16))
    # the state round-trips, masters included
    clone = tiny_model(seed=2, dtype=torch.bfloat16)
    other = build_optimizer(clone.parameters(), cfg)
    other.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_step_buckets_hold_whole_tensors_under_the_budget():
    assert step_buckets([10, 10, 10, 10], bucket_bytes=80) == [[0, 1], [2, 3]]
    assert step_buckets([10, 50, 10, 5, 5], bucket_bytes=80) == [[0], [1], [2, 3, 4]]  # 200 B alone
    assert step_buckets([], bucket_bytes=80) == []


def test_bucketed_master_step_equals_one_step_and_bounds_the_fp32_gradients():
    """Stepping a bucket at a time gives the same weights and optimizer state as one step over all
    tensors, and the fp32 gradients + AdamW temporaries alive at once stay within one bucket's."""
    torch.manual_seed(0)
    one = tiny_model(seed=2, dtype=torch.bfloat16)
    many = tiny_model(seed=2, dtype=torch.bfloat16)
    params = [list(m.parameters()) for m in (one, many)]
    n, largest = sum(p.numel() for p in params[0]), max(p.numel() for p in params[0])
    bucket = 64 * 1024
    cfg = TrainCfg(lr=1e-3, weight_decay=0.01)
    opts = [build_optimizer(params[0], cfg), build_optimizer(params[1], cfg)]
    make = opts[1].inner.__class__
    opts[0] = MasterWeights(params[0], lambda ps: make(ps, lr=1e-3, weight_decay=0.01, foreach=True), 2**40)
    opts[1] = MasterWeights(params[1], lambda ps: make(ps, lr=1e-3, weight_decay=0.01, foreach=True), bucket)
    assert len(opts[0].buckets) == 1 and len(opts[1].buckets) > 4
    peaks = []
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params[0]]
        grads[3] = None  # a parameter without a gradient is skipped, in every bucket
        for ps, opt in zip(params, opts):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
            with AllocationTracker() as tracker:
                opt.step()
            peaks.append(tracker.peak - tracker.live)  # what the step held only while it ran
            assert all(p.grad is None for p in ps) and all(m.grad is None for m in opt.masters)
    for a, b in zip(opts[0].masters, opts[1].masters):
        assert torch.equal(a, b)
    for a, b in zip(params[0], params[1]):
        assert torch.equal(a, b)
    assert opts[1].state_dict()["inner"]["state"].keys() == opts[0].state_dict()["inner"]["state"].keys()
    bound = step_transient_bytes(n, True, "adamw", largest, bucket)  # 2 x one bucket (or the largest tensor)
    assert bound < 8 * n and max(peaks[1::2]) <= bound < peaks[0]
    assert peaks[0] > 7 * n  # one bucket over everything: 4n of fp32 gradients + 4n of temporaries


def test_fp32_params_use_plain_adamw():
    assert isinstance(build_optimizer(tiny_model().parameters(), TrainCfg()), torch.optim.AdamW)


def test_8bit_adam_needs_cuda():
    with pytest.raises(ValueError, match=r"train\.optimizer=adamw8bit needs CUDA"):
        build_optimizer(tiny_model().parameters(), TrainCfg(optimizer="adamw8bit"))


def test_no_trainable_parameters():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.parameters(), TrainCfg())


def test_fp32_norm_gains_take_the_steps_that_bf16_gains_cannot():
    # norms_in_fp32: the gains in fp32, the rest bf16; the same logits before any step (the gains
    # are bf16 values), then three AdamW steps at lr 1e-5 move every fp32 gain (a bf16 gain near 1
    # would need ~2^-8 / 1e-5 = 400 of them) and the logits with them: the fp32 product of a
    # gain and a bf16 row crosses a rounding boundary with probability ~ step / bf16 spacing (a
    # gain of exactly 1, as initialised, never does: its products sit on the grid)
    from minigrpo.models.transformer import RMSNorm

    mixed, plain = tiny_model(seed=1, dtype=torch.bfloat16), tiny_model(seed=1, dtype=torch.bfloat16)
    gains = {m: [x.weight for x in m.modules() if isinstance(x, RMSNorm)] for m in (mixed, plain)}
    torch.manual_seed(0)
    trained = [1 + 0.2 * torch.randn_like(w, dtype=torch.float32) for w in gains[mixed]]  # not 1: see below
    with torch.no_grad():
        for m in (mixed, plain):
            for w, t in zip(gains[m], trained):
                w.copy_(t)
    mixed.norms_in_fp32()
    gains[mixed] = [x.weight for x in mixed.modules() if isinstance(x, RMSNorm)]
    assert {w.dtype for w in gains[mixed]} == {torch.float32} and {w.dtype for w in gains[plain]} == {torch.bfloat16}
    assert mixed.dtype == torch.bfloat16 and mixed.lm_head.weight.dtype == torch.bfloat16  # the rest stays bf16
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(mixed(ids), plain(ids))
    before = {m: [w.detach().clone() for w in gains[m]] for m in (mixed, plain)}
    for model in (mixed, plain):
        opt = build_optimizer(model.parameters(), TrainCfg(lr=1e-5))
        for _ in range(3):
            model(ids).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    assert all(not torch.equal(w, w0) for w, w0 in zip(gains[mixed], before[mixed]))
    assert all(torch.equal(w, w0) for w, w0 in zip(gains[plain], before[plain]))
    with torch.no_grad():
        assert not torch.equal(mixed(ids), plain(ids))


@pytest.mark.parametrize(
    ("dtype", "sections", "fp32"),
    [
        ("bfloat16", {}, True),
        ("bfloat16", {"train": {"fp32_norms": False}}, False),
        ("bfloat16", {"lora": {"enabled": True, "r": 2}}, False),  # frozen gains stay as loaded
        ("float32", {}, True),
    ],
)
def test_the_policy_keeps_its_gains_in_fp32_for_16_bit_full_fine_tuning(tmp_path, dtype, sections, fp32):
    from helpers.runs import run_config

    from minigrpo.build import load_policy
    from minigrpo.config import Config

    cfg = Config.from_dict(run_config(tmp_path, run={"dtype": dtype}, **sections))
    model, _ = load_policy(cfg, torch.device("cpu"), getattr(torch, dtype))
    gain = model.model.norm.weight
    assert (gain.dtype == torch.float32) == fp32 and model.model.embed_tokens.weight.dtype == getattr(torch, dtype)


# ------------------------------------------------------------------------------------------------
# AdamW against torch and the formulas; the master-weight step; schedules; resume; refused layouts


def _adamw_float64(params, grads_per_step, lr, betas, eps, weight_decay):
    """AdamW from its formulas in float64 (decoupled decay on matrices only, none on vectors: biases
    and norm gains; a tensor without a gradient in a step is left alone and its step count does not
    advance, as torch does). Returns the final values."""
    b1, b2 = betas
    values = [p.detach().double().clone() for p in params]
    m, v, t = [torch.zeros_like(x) for x in values], [torch.zeros_like(x) for x in values], [0] * len(values)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g, t[i] = g.double(), t[i] + 1
            values[i] *= 1 - lr * (weight_decay if values[i].dim() >= 2 else 0.0)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = (v[i] / (1 - b2 ** t[i])).sqrt() + eps
            values[i] -= lr / (1 - b1 ** t[i]) * m[i] / denom
    return values


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone().to(p.dtype)


def test_adamw_matches_torch_and_the_float64_formulas():
    """build_optimizer's AdamW (foreach on the CPU) over several steps, with betas, eps and weight decay
    set, a zero-size tensor, one tensor skipped in two steps and a frozen one left out: equal to
    torch's single-tensor AdamW within 1e-7 and to the float64 formulas within 1e-6 (fp32 rounding of
    5 steps at lr 1e-2 on values ~1; measured 0 and 2.9e-7). The decay is on the matrix only."""
    torch.manual_seed(0)
    cfg = TrainCfg(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    shapes = [(5, 3), (0,), (7,)]
    ours = [nn_param(torch.randn(s)) for s in shapes]
    frozen = nn_param(torch.randn(4), requires_grad=False)
    theirs = [nn_param(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = build_optimizer([*ours, frozen], cfg)
    groups = [{"params": theirs[:1]}, {"params": theirs[1:], "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]  # the frozen tensor is not stepped
    steps = [[torch.randn(s) for s in shapes] for _ in range(5)]
    steps[1][2] = steps[3][2] = None
    for grads in steps:
        before = ours[2].detach().clone()
        _set_grads(ours, grads), _set_grads(theirs, grads)
        opt.step(), ref.step()
        if grads[2] is None:
            assert torch.equal(ours[2], before)  # skipped: neither decayed nor moved by its old moments
    for a, b, c in zip(ours, theirs, _adamw_float64(start, steps, 1e-2, (0.8, 0.95), 1e-6, 0.1)):
        assert a.shape == c.shape
        if a.numel():
            assert (a - b).abs().max() <= 1e-7 and (a.double() - c).abs().max() <= 1e-6
    assert opt.state[ours[2]]["step"] == 3 and opt.state[ours[0]]["step"] == 5


def nn_param(t, requires_grad=True):
    return torch.nn.Parameter(t, requires_grad=requires_grad)


def test_master_weights_step_fp32_adamw_and_round_it_even_with_an_empty_first_tensor():
    """bf16 parameters, the first of zero size (step_buckets opened no bucket for it: IndexError):
    the masters step exactly as torch's AdamW on fp32 copies fed the bf16 gradients cast to fp32,
    each parameter is its master rounded to bf16, and the scheduled LR reaches the inner optimizer."""
    assert step_buckets([0, 10], bucket_bytes=80) == [[0, 1]] and step_buckets([0]) == [[0]]
    torch.manual_seed(0)
    params = [nn_param(torch.randn(s).bfloat16()) for s in [(0,), (64, 32), (33,)]]
    cfg = TrainCfg(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, warmup_steps=2, schedule="cosine", steps=6)
    opt = build_optimizer(params, cfg)
    fp32 = [nn_param(m.detach().clone()) for m in opt.masters]
    groups = [{"params": fp32[1:2]}, {"params": [fp32[0], fp32[2]], "weight_decay": 0.0}]  # no decay on vectors
    ref = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=True)
    scheds = [build_scheduler(o, cfg, 6) for o in (opt, ref)]
    for step in range(6):
        grads = [torch.randn(p.shape).bfloat16() for p in params]
        grads[1] = None if step == 2 else grads[1]
        _set_grads(params, grads), _set_grads(fp32, [None if g is None else g.float() for g in grads])
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == cfg.lr * lr_factor(step, cfg, 6)
        opt.step(), ref.step()
        [s.step() for s in scheds]
        for p, m, r in zip(params, opt.masters, fp32):
            assert torch.equal(m, r) and torch.equal(p, m.to(torch.bfloat16))


def test_master_weights_step_calls_the_closure():
    """torch's Optimizer.step(closure) contract: the closure runs (gradients on) and its loss comes back."""
    p = nn_param(torch.ones(3, dtype=torch.bfloat16))
    opt = build_optimizer([p], TrainCfg(lr=0.1))

    def closure():
        loss = (p.float() ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss is not None and float(loss.detach()) == 3.0 and torch.all(p < 1)


def _expected_factor(step, schedule, warmup, total, floor):
    """The schedule written from its definition: warmup (step+1)/warmup, then from 1 down to `floor`
    over the remaining total - warmup steps (reached after the last one), clamped there; a run all warmup
    is at the floor past its end (not back at the peak)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    x = 1.0 if total <= warmup else min((step - warmup) / (total - warmup), 1.0)
    shape = 1 - x if schedule == "linear" else (1 + math.cos(math.pi * x)) / 2
    return floor + (1 - floor) * shape


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 7), (7, 7), (0, 1), (1, 1)])
def test_the_lr_each_step_uses_follows_the_schedule(schedule, warmup, total):
    """The LR read before each step (what step.optimizer_step logs) is the rate the step applies and
    equals the formula within 1e-15, over every step and two past the end."""
    cfg = TrainCfg(lr=0.5, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.2, steps=total)
    p = nn_param(torch.zeros(1))
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, total)
    opt.param_groups[0]["betas"] = (0.0, 0.0)  # each step moves p by lr * sign(g) exactly (up to eps)
    for step in range(total + 2):
        logged, before = opt.param_groups[0]["lr"], p.detach().clone()
        assert logged == pytest.approx(0.5 * _expected_factor(step, schedule, warmup, total, 0.2), abs=1e-15)
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
        assert float(before - p.detach()) == pytest.approx(logged, rel=1e-6)


def _train(model, opt, sched, ids, n):
    """n steps as step.optimizer_step takes them (clip, step, schedule, zero); returns the LRs used."""
    lrs = []
    for _ in range(n):
        model(ids).float().logsumexp(-1).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step(), opt.zero_grad()
    return lrs


def test_a_resume_mid_schedule_continues_bit_identically(tmp_path):
    """bf16 model with fp32 masters, warmup + cosine with a floor: 3 steps, save the optimizer and
    schedule state (safetensors + JSON), 5 more; a fresh model and optimizer (another lr, which the
    state overrides) resumed from the files take the same 5 LRs and end bit-identical."""
    from minigrpo.checkpoint import load_trainer_state, save_trainer_state
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    cfg = TrainCfg(lr=1e-3, betas=(0.85, 0.97), eps=1e-7, weight_decay=0.05, warmup_steps=2, schedule="cosine")
    cfg.min_lr_ratio, ids = 0.1, torch.randint(3, 128, (2, 9))
    model = tiny_model(seed=1, dtype=torch.bfloat16)
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg, 8)
    _train(model, opt, sched, ids, 3)
    state = {"step": 3, "optimizer": optimizer_state(model, opt), "scheduler": sched.state_dict()}
    save_trainer_state(tmp_path, state)
    assert sorted(p.suffix for p in (tmp_path / "trainer_state").iterdir()) == [".json", ".safetensors"]
    lrs = _train(model, opt, sched, ids, 5)
    twin = tiny_model(seed=2, dtype=torch.bfloat16)
    twin_opt = build_optimizer(twin.parameters(), TrainCfg(lr=5.0, weight_decay=0.05))  # a resume keeps the decay
    twin_sched = build_scheduler(twin_opt, cfg, 8)
    saved = load_trainer_state(tmp_path)
    load_optimizer_state(twin, twin_opt, saved["optimizer"])
    twin_sched.load_state_dict(saved["scheduler"])
    assert {k: v for k, v in twin_opt.param_groups[0].items() if k != "params"} == {
        k: v for k, v in opt.param_groups[0].items() if k != "params"
    } | {"lr": lrs[0]}
    assert _train(twin, twin_opt, twin_sched, ids, 5) == lrs == [1e-3 * lr_factor(s, cfg, 8) for s in range(3, 8)]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.masters, twin_opt.masters):
        assert torch.equal(a, b)


def test_the_fp32_masters_of_a_16_bit_checkpoint_resume_into_an_fp32_run(tmp_path):
    """run.dtype "auto" is bf16 on CUDA and fp32 on the CPU, and run.device may change on resume: a bf16
    run's checkpoint resumed in fp32 holds bf16 weights, and its fp32 masters must become the
    parameters (before: the masters were dropped, the run went on from the bf16 rounding, up to 2^-9
    of each weight away), after which it steps as the bf16 run's masters do."""
    from minigrpo.checkpoint import load_trainer_state, save_trainer_state
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    cfg, ids = TrainCfg(lr=1e-2, weight_decay=0.0), torch.randint(3, 128, (2, 9))
    model = tiny_model(seed=1, dtype=torch.bfloat16)
    opt = build_optimizer(model.parameters(), cfg)
    _train(model, opt, build_scheduler(opt, cfg, 4), ids, 2)
    save_trainer_state(tmp_path, {"step": 2, "optimizer": optimizer_state(model, opt)})
    fp32 = tiny_model(seed=2)
    with torch.no_grad():  # what load_weights does with the bf16 checkpoint
        for a, b in zip(fp32.parameters(), model.parameters()):
            a.copy_(b)
    fp32_opt = build_optimizer(fp32.parameters(), cfg)
    assert not isinstance(fp32_opt, MasterWeights)
    load_optimizer_state(fp32, fp32_opt, load_trainer_state(tmp_path)["optimizer"])
    masters = dict(zip([n for n, _ in model.named_parameters()], opt.masters))
    for name, p in fp32.named_parameters():
        assert torch.equal(p, masters[name]), f"{name}: {(p - masters[name]).abs().max():.2e} from its master"
    # the same AdamW step on the same fp32 values (the gradients of the bf16 model differ: compare one step)
    for p, m in zip(fp32.parameters(), opt.masters):
        p.grad = m.grad = torch.full_like(m, 0.5)
    fp32_opt.step(), opt.inner.step()
    for p, m in zip(fp32.parameters(), opt.masters):
        assert torch.equal(p, m)


class _One(torch.nn.Module):
    def __init__(self, rows, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(rows, 4).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("saved_rows", "rows"), [(1, 8), (8, 1)])
def test_a_state_for_other_shapes_is_refused_before_anything_loads(dtype, saved_rows, rows):
    """Same names, other shapes (a changed vocabulary or LoRA rank): one line naming the parameter
    and both shapes, the weights untouched (a (1, 4) master copied into (8, 4) broadcast over it; the
    other way round torch loaded the moments and the next step failed with a broadcast error)."""
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    old, new = _One(saved_rows, dtype), _One(rows, dtype)
    opt = build_optimizer(old.parameters(), TrainCfg())
    old.w.grad = torch.randn_like(old.w)
    opt.step()
    other = build_optimizer(new.parameters(), TrainCfg())
    before = new.w.detach().clone()
    expected = rf"for other parameters: w is \({rows}, 4\) here, its saved \w+ \({saved_rows}, 4\)$"
    with pytest.raises(ValueError, match=expected):
        load_optimizer_state(new, other, optimizer_state(old, opt))
    assert torch.equal(new.w, before) and not other.state
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match=rf"master 0 is \({saved_rows}, 4\) saved, \({rows}, 4\) here"):
            other.load_state_dict(opt.state_dict())
        assert torch.equal(new.w, before)


def test_a_state_with_the_parameters_in_another_order_names_the_first_difference():
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    model = tiny_model()
    saved = optimizer_state(model, build_optimizer(model.parameters(), TrainCfg()))
    names = saved["param_names"]
    saved["param_names"] = [names[1], names[0], *names[2:]]
    with pytest.raises(ValueError, match=rf"another order \(position 0: {names[0]} here, {names[1]} saved\)"):
        load_optimizer_state(model, build_optimizer(model.parameters(), TrainCfg()), saved)


class _Mixed(torch.nn.Module):
    """A large and a small trainable matrix with a frozen parameter listed between them."""

    def __init__(self, dtype, rows=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(rows, 128, generator=g).to(dtype))
        self.frozen = torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(4, 2, generator=g).to(dtype))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    model.a.grad = torch.randn(model.a.shape, generator=g).to(model.a.dtype)
    model.b.grad = torch.randn(model.b.shape, generator=g).to(model.b.dtype)
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_optimizer_listing_the_parameters_in_another_order_keeps_each_state_under_its_name(dtype):
    """The optimizer's order (here b before a) is not the model's: every moment and master is saved
    under the name of the parameter it belongs to (they were filed by position, so a's entry held b's
    moments, a resume refused with a bogus shape message and FSDP's load_masters copied b into a),
    and a resume continues bit-identically."""
    from minigrpo.optim_state import load_masters, load_optimizer_state, optimizer_state

    model = _Mixed(dtype)
    opt = build_optimizer([model.b, model.a], TrainCfg(lr=1e-2))
    _step(model, opt, 1)
    saved = optimizer_state(model, opt)
    stepped = {"a": model.a, "b": model.b}
    if isinstance(opt, MasterWeights):
        stepped = {n: next(m for q, m in zip(opt.params, opt.masters) if q is p) for n, p in stepped.items()}
        assert torch.equal(saved["masters"]["a"], stepped["a"]) and torch.equal(saved["masters"]["b"], stepped["b"])
    for name, t in stepped.items():
        assert torch.equal(saved["state"][name]["exp_avg"], opt.state[t]["exp_avg"])
    assert saved["param_names"] == ["b", "a"]
    fresh = _Mixed(torch.float32, seed=1)
    load_masters(fresh, optimizer_state(model, opt, fp32_params=True))  # FSDP's way in: by name
    assert torch.equal(fresh.a, stepped["a"].float()) and torch.equal(fresh.b, stepped["b"].float())

    other = _Mixed(dtype, seed=1)
    with torch.no_grad():
        other.a.copy_(model.a), other.b.copy_(model.b)
    resumed = build_optimizer([other.b, other.a], TrainCfg(lr=1e-2))
    load_optimizer_state(other, resumed, saved)
    _step(model, opt, 2)
    _step(other, resumed, 2)
    assert torch.equal(model.a, other.a) and torch.equal(model.b, other.b)


def _adamw8bit(params):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_adamw_state_is_a_snapshot_that_resumes_exactly(tmp_path, dtype):
    """8-bit AdamW keeps its state in a nested dict (state1/state2 shaped like the parameter, 256-entry
    quantisation maps, block scales): saved as copies (they were the live tensors, so the steps after
    a save changed the saved state), through the trainer-state files, and resumed bit-identically."""
    from minigrpo.checkpoint import load_trainer_state, save_trainer_state
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    def make(ps):
        return MasterWeights(ps, _adamw8bit) if dtype == torch.bfloat16 else _adamw8bit(ps)

    model = _Mixed(dtype)
    opt = make([model.a, model.b])
    _step(model, opt, 1)
    saved = optimizer_state(model, opt)
    quant = saved["state"]["a"]["__bnb_optimizer_quant_state__"]
    assert quant["state1"].dtype == torch.uint8 and quant["qmap1"].shape == (256,)
    before = {k: v.clone() for k, v in quant.items()}
    _step(model, opt, 2)
    assert all(torch.equal(quant[k], v) for k, v in before.items())
    save_trainer_state(tmp_path, {"step": 1, "optimizer": saved})

    other = _Mixed(dtype, seed=1)
    resumed = make([other.a, other.b])
    load_optimizer_state(other, resumed, load_trainer_state(tmp_path)["optimizer"])
    load_optimizer_state(model, opt, saved)  # both continue from the saved step
    with torch.no_grad():
        other.a.copy_(model.a), other.b.copy_(model.b)
    if dtype == torch.bfloat16:
        for m, r in zip(opt.masters, resumed.masters):
            assert torch.equal(m, r)
    _step(model, opt, 3)
    _step(other, resumed, 3)
    assert torch.equal(model.a, other.a) and torch.equal(model.b, other.b)


def test_8bit_adamw_state_for_other_shapes_is_refused_before_anything_loads():
    """The shape check reads the nested 8-bit state too (it skipped it: torch loaded the state and
    the next step failed inside the optimizer with a broadcast error)."""
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    model = _Mixed(torch.float32)
    opt = _adamw8bit([model.a, model.b])
    _step(model, opt, 1)
    other = _Mixed(torch.float32, rows=32)
    resumed = _adamw8bit([other.a, other.b])
    with pytest.raises(ValueError, match=r"for other parameters: a is \(32, 128\) here, its saved state1 \(64, 128\)$"):
        load_optimizer_state(other, resumed, optimizer_state(model, opt))
    assert not resumed.state


@pytest.mark.parametrize(("saved_with", "resumed_with"), [("adamw", "adamw8bit"), ("adamw8bit", "adamw")])
def test_a_state_of_the_other_optimizer_kind_is_refused_naming_both(saved_with, resumed_with):
    """train.optimizer changed between the save and the resume (the memory pre-flight suggests
    adamw8bit): the state loaded, and the first step failed with KeyError 'state1' (or 'exp_avg')."""
    from minigrpo.optim_state import load_optimizer_state, optimizer_state

    def make(kind, model):
        params = [model.a, model.b]
        return _adamw8bit(params) if kind == "adamw8bit" else build_optimizer(params, TrainCfg())

    model, other = _Mixed(torch.float32), _Mixed(torch.float32, seed=1)
    opt = make(saved_with, model)
    _step(model, opt, 1)
    resumed = make(resumed_with, other)
    names = {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}
    expected = rf"\({names[saved_with]}\), this run steps {names[resumed_with]}: resume with the train.optimizer"
    with pytest.raises(ValueError, match=expected):
        load_optimizer_state(other, resumed, optimizer_state(model, opt))
    assert not resumed.state
