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
