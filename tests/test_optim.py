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
