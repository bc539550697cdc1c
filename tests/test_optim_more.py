"""The optimizer against its references: which tensors decay (HF Trainer's split), the lr schedules
against transformers', and clipped AdamW steps against torch's clip_grad_norm_ and AdamW."""

from __future__ import annotations

import types

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo.config import LoRACfg, TrainCfg
from minigrpo.distributed import World
from minigrpo.grad_scale import optimizer_step
from minigrpo.lora import apply_lora
from minigrpo.optim import MasterWeights, build_optimizer, build_scheduler, decay_groups, lr_factor


def _qwen2(dtype=torch.float32):
    """A tiny Qwen2: q/k/v biases, RMSNorm gains, untied embedding and LM head."""
    return tiny_model(seed=3, dtype=dtype, model_type="qwen2", architectures=["Qwen2ForCausalLM"])


def _stepped_tensors(model, opt):
    """name -> the tensor the optimizer steps for it (its fp32 master under MasterWeights)."""
    named = dict(model.named_parameters())
    if isinstance(opt, MasterWeights):
        master_of = {id(p): m for p, m in zip(opt.params, opt.masters)}
        return {n: master_of[id(p)] for n, p in named.items()}
    return named


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_decay_spares_biases_and_norm_gains_as_hf_trainer_does(dtype):
    """train.weight_decay 0.1 at lr 0.5, one step on zero gradients (Adam's update is then exactly 0,
    only the decoupled decay acts): the tensors that shrink by (1 - lr * wd), bit for bit, are exactly
    those transformers' Trainer.get_decay_parameter_names picks (projections, embedding, LM head),
    and the q/k/v biases and RMSNorm gains do not move at all (they decayed: a gain of 1 became 0.95).
    The same on a bf16 model through its fp32 masters."""
    from transformers import Trainer

    model = _qwen2(dtype)
    lr, wd = 0.5, 0.1
    opt = build_optimizer(model.parameters(), TrainCfg(lr=lr, weight_decay=wd))
    stepped = _stepped_tensors(model, opt)
    before = {n: t.detach().clone() for n, t in stepped.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = {n for n, t in stepped.items() if not torch.equal(t, before[n])}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))
    assert {n for n in stepped if n.endswith("bias")} and not {n for n in decayed if n.endswith("bias")}
    for name, t in stepped.items():
        expected = before[name] * (1 - lr * wd) if name in decayed else before[name]
        assert torch.equal(t, expected), name


def test_weight_decay_groups():
    """With decay, matrices (LoRA factors too) decay and vectors do not; without it one group in the
    parameters' order, the layout checkpoints saved before the split hold (a resume keeps
    train.weight_decay); no empty group."""
    params = list(_qwen2().parameters())
    some = decay_groups(params, 0.1)
    assert [g["weight_decay"] for g in some] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in some[0]["params"]) and all(p.dim() < 2 for p in some[1]["params"])
    assert sum(len(g["params"]) for g in some) == len(params)
    (zero,) = decay_groups(params, 0.0)
    assert zero["params"] == params and zero["weight_decay"] == 0.0
    model = _qwen2()
    apply_lora(model, LoRACfg(enabled=True, r=2))
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert [len(g["params"]) for g in decay_groups(adapters, 0.1)] == [len(adapters)]


def _hf_factors(schedule, warmup, total, floor):
    """transformers' multipliers for each of total + 2 optimizer steps."""
    from transformers import optimization as hf

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule == "constant" or warmup == total:  # all warmup: nothing decays within the run
        sched = hf.get_constant_schedule_with_warmup(opt, warmup)
    elif schedule == "linear":
        sched = hf.get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = hf.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=floor)
    factors = []
    for _ in range(total + 2):
        factors.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    return factors


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "steps", "updates"), [(0, 7, 1), (3, 7, 1), (2, 5, 3), (5, 5, 2), (0, 1, 1)])
def test_schedules_follow_transformers_after_the_warmup(schedule, warmup, steps, updates):
    """Over every optimizer step (steps x updates, warmup counted in training steps: warmup x updates
    updates), each lr factor within 1e-12 of transformers' get_*_schedule_with_warmup, where ours is
    documented to differ as stated: the warmup takes (k + 1) / W at update k (transformers' k / W
    spends the first update at lr 0), linear's floor is min_lr_ratio + (1 - min_lr_ratio) x
    transformers' factor (cosine's is transformers' min_lr_rate), and past the end the floor holds
    (transformers' cosine turns back up; a run that is all warmup is checked within its steps)."""
    floor = 0.0 if schedule == "linear" and warmup == 3 else 0.2
    cfg = TrainCfg(lr=1.0, schedule=schedule, warmup_steps=warmup, min_lr_ratio=floor, steps=steps)
    total, w = steps * updates, warmup * updates
    hf = _hf_factors(schedule, w, total, floor)
    ours = [lr_factor(k, cfg, total, updates) for k in range(total + 2 if w < total else total)]
    for k, factor in enumerate(ours):
        if k < w:
            expected = (k + 1) / w
        elif k >= total:
            expected = 1.0 if schedule == "constant" else floor
        elif schedule == "linear":
            expected = floor + (1 - floor) * hf[k]
        else:
            expected = hf[k]
        assert factor == pytest.approx(expected, abs=1e-12), (k, factor, expected)
    sched = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, total, updates)
    assert sched.get_last_lr() == [ours[0]]


def _lora_model():
    model = tiny_model(seed=4)
    apply_lora(model, LoRACfg(enabled=True, r=4, targets=["q", "v", "down"]))
    with torch.no_grad():  # B starts at 0: give every adapter a gradient from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("max_norm", [0.05, None])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "lora"])
def test_clipped_steps_equal_torch_clip_grad_norm_and_adamw(kind, max_norm):
    """Three updates through step.optimizer_step (global norm, clip, step): the norm it reports equals
    torch.nn.utils.clip_grad_norm_ over fp32 copies of every trainable gradient within 1e-6 relative,
    and the stepped tensors (fp32 parameters, LoRA adapters only, or a bf16 model's fp32 masters) stay
    within two fp32 ulps (of the value, at least 1) of torch's AdamW stepping those fp32 copies with the
    same groups, betas, eps and decay (fp32 rounding: one ulp measured on the norm weights near 1),
    clipping engaged (norms ~1 against 0.05) or off (None)."""
    model = _lora_model() if kind == "lora" else tiny_model(seed=1, dtype=torch.bfloat16 if kind == "bf16" else None)
    train = TrainCfg(lr=1e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, max_grad_norm=max_norm)
    opt = build_optimizer(model.parameters(), train)
    sched = build_scheduler(opt, train, 10)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stepped = opt.masters if isinstance(opt, MasterWeights) else trainable
    assert isinstance(opt, MasterWeights) == (kind == "bf16")
    copies = [torch.nn.Parameter(t.detach().float().clone()) for t in stepped]
    ref = torch.optim.AdamW(decay_groups(copies, 0.1), lr=1e-3, betas=(0.8, 0.95), eps=1e-7, foreach=False)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids).float().logsumexp(-1).mean().backward()
        for c, p in zip(copies, trainable):
            c.grad = p.grad.float().clone()
        norm = torch.nn.utils.clip_grad_norm_(copies, max_norm or float("inf"))
        ours, _ = optimizer_step(types.SimpleNamespace(train=train), model, opt, sched, World())
        ref.step(), ref.zero_grad()
        assert ours == pytest.approx(float(norm), rel=1e-6) and (max_norm is None or ours > 10 * max_norm)
        ulp = torch.finfo(torch.float32).eps  # of values in [1, 2): the norms' weights are there
        assert all(((t.float() - c).abs() <= 2 * ulp * c.abs().clamp_min(1)).all() for t, c in zip(stepped, copies))
