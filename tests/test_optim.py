"""Optimizers and schedules: fp32 master weights for 16-bit models, lr shapes, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo.config import TrainCfg
from minigrpo.optim import MasterWeights, build_optimizer, build_scheduler, lr_factor


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


def test_fp32_params_use_plain_adamw():
    assert isinstance(build_optimizer(tiny_model().parameters(), TrainCfg()), torch.optim.AdamW)


def test_8bit_adam_needs_cuda():
    with pytest.raises(ValueError, match=r"train\.optimizer=adamw8bit needs CUDA"):
        build_optimizer(tiny_model().parameters(), TrainCfg(optimizer="adamw8bit"))


def test_no_trainable_parameters():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.parameters(), TrainCfg())
