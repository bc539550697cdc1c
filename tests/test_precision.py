"""A 16-bit policy trained in full starts its optimizer's fp32 masters from the checkpoint's own values
(build.load_policy), not from their bf16 rounding: masters that equal the bf16 weights sit mid-interval,
so the policy stands still for its first steps (optim.py). Checked as the distance the policy moves in
one step, against the fp32 model taking the same step.
"""

from __future__ import annotations

import copy

import torch

from minigrpo.config import TrainCfg
from minigrpo.optim import build_optimizer


def load(tmp_path, dtype: str, masters: dict | None = None, **sections):
    from helpers.runs import run_config

    from minigrpo.build import load_policy
    from minigrpo.config import Config

    cfg = Config.from_dict(run_config(tmp_path, run={"dtype": dtype}, **sections))
    return load_policy(cfg, torch.device("cpu"), getattr(torch, dtype), masters=masters)[0]


def test_masters_start_from_the_checkpoint_values(tmp_path):
    masters: dict = {}
    model = load(tmp_path, "bfloat16", masters)
    plain = load(tmp_path, "bfloat16")  # read straight in bf16: the same model
    full = load(tmp_path, "float32")
    named = dict(model.named_parameters())
    gain = model.model.norm.weight
    assert gain.dtype == torch.float32 and gain not in masters  # an fp32 gain is its own master
    assert len(masters) == len(named) - sum(p.dtype == torch.float32 for p in named.values())
    for (name, p), (_, p32), (_, q) in zip(named.items(), full.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name
        if p in masters:
            assert torch.equal(masters[p], p32) and torch.equal(p, p32.to(p.dtype)), name
    off_grid = [(m != m.bfloat16().float()).float().mean().item() for m in masters.values()]
    assert min(off_grid) > 0.9  # the checkpoint is fp32: almost no value is a bf16 number
    ids = torch.randint(3, model.args.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    optimizer = build_optimizer(model.parameters(), TrainCfg(), masters=masters)
    assert all(torch.equal(m, masters[p]) for p, m in zip(optimizer.params, optimizer.masters) if p in masters)


def test_a_16_bit_policy_moves_from_its_first_step_as_an_fp32_one_does(tmp_path):
    # one AdamW step at lr 1e-5 on a GRPO-shaped loss: how much the step raises the objective, against
    # the fp32 model taking the same step (the objective is read in fp32 from the weights, so that the
    # bf16 forward's own rounding does not blur it). Masters equal to the bf16 weights sit mid-interval:
    # only the smallest weights (|w| < 2.5e-3) can cross half a bf16 step, so the policy barely moves
    torch.manual_seed(0)
    ids = torch.randint(3, 20, (16, 12))  # (B, T)
    advantages = torch.randn(16)
    advantages -= advantages.mean()

    def objective(model) -> torch.Tensor:
        logits = model(ids).float()  # (B, T, V)
        logp = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        return (advantages[:, None] * logp).mean()

    def gain(model, masters=None) -> float:
        optimizer = build_optimizer(model.parameters(), TrainCfg(lr=1e-5), masters=masters)
        with torch.no_grad():
            before = objective(copy.deepcopy(model).float())
        (-objective(model)).backward()
        optimizer.step()
        with torch.no_grad():
            return (objective(copy.deepcopy(model).float()) - before).item()

    masters: dict = {}
    reference = gain(load(tmp_path, "float32"))
    from_checkpoint = gain(load(tmp_path, "bfloat16", masters), masters)
    from_rounding = gain(load(tmp_path, "bfloat16"))
    assert reference > 1e-4
    assert 0.5 * reference < from_checkpoint < 2.5 * reference, (reference, from_checkpoint)
    assert abs(from_rounding) < 0.1 * reference, (reference, from_rounding)
