"""Where the fp32 masters of a 16-bit policy start (optim.py): from the checkpoint's own values where it
has more precision (build.load_policy), else dithered in each weight's rounding interval; never all on
the bf16 grid, where they sit mid-interval and the policy stands still for its first steps. Checked as
the distance the policy moves in one step, against fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minigrpo.config import TrainCfg
from minigrpo.optim import build_optimizer, dithered


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dithered_masters_round_back_to_their_weights(dtype):
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, info.tiny, info.tiny / 4, -info.max, info.max])
    w = torch.cat([special, torch.randn(20_000) * 0.05, torch.randn(1000) * 30]).to(dtype)  # (n,)
    gen = torch.Generator().manual_seed(0)
    m = dithered(w, gen, chunk=4096)
    assert m.dtype == torch.float32 and torch.equal(m.to(dtype), w)  # the model does not change
    inf = torch.full_like(w, float("inf"))
    up, down = torch.nextafter(w, inf).float(), torch.nextafter(w, -inf).float()
    finite = torch.isfinite(up) & torch.isfinite(down)
    assert ((m > (w.float() + down) / 2) & (m < (w.float() + up) / 2))[finite].all()  # inside, clear of ties
    u = ((m - down) / (up - down))[finite & (w != 0)]  # where in [down, up] each landed, about 0.25..0.75
    moved = (m != w.float())[finite]
    assert moved.float().mean() > 0.99 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(dithered(w, torch.Generator().manual_seed(0), chunk=4096), m)  # reproducible


def test_a_16_bit_checkpoint_gives_no_start_values(tmp_path):
    from minigrpo.models.loading import load_pretrained, save_pretrained

    model = load(tmp_path, "float32")
    save_pretrained(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    masters: dict = {}
    sections = {"model": {"name_or_path": str(tmp_path / "bf16")}}
    policy = load(tmp_path, "bfloat16", masters, **sections)
    assert masters == {}  # nothing beyond bf16 to keep: the optimizer dithers
    plain, _ = load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    for p, q in zip(policy.parameters(), plain.parameters()):
        assert torch.equal(p.float(), q.float())


@pytest.mark.parametrize(("start", "low", "high"), [("checkpoint", 0.5, 2.5), ("dithered", 0.4, 2.5), ("grid", 0, 0.1)])
def test_a_16_bit_policy_moves_from_its_first_step_as_an_fp32_one_does(tmp_path, start, low, high):
    # one AdamW step at lr 1e-5 on a GRPO-shaped loss: how much it raises the objective, against the
    # fp32 model taking the same step (the objective is read in fp32 from the weights, so the bf16
    # forward's own rounding does not blur it). Masters on the bf16 grid, mid-interval: only the
    # smallest weights (|w| < 2.5e-3) can cross half a bf16 step, and the policy barely moves
    torch.manual_seed(0)
    ids = torch.randint(3, 20, (16, 12))  # (B, T)
    advantages = torch.randn(16)
    advantages -= advantages.mean()

    def objective(model) -> torch.Tensor:
        logits = model(ids).float()  # (B, T, V)
        logp = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        return (advantages[:, None] * logp).mean()

    def gain(model, masters=None, on_grid=False) -> float:
        optimizer = build_optimizer(model.parameters(), TrainCfg(lr=1e-5), masters=masters)
        if on_grid:  # what masters made from the bf16 weights would be
            for p, m in zip(optimizer.params, optimizer.masters):
                m.data.copy_(p.detach().float())
        with torch.no_grad():
            before = objective(copy.deepcopy(model).float())
        (-objective(model)).backward()
        optimizer.step()
        with torch.no_grad():
            return (objective(copy.deepcopy(model).float()) - before).item()

    reference = gain(load(tmp_path, "float32"))
    masters: dict = {}
    model = load(tmp_path, "bfloat16", masters)
    moved = gain(model, {} if start == "dithered" else masters, on_grid=start == "grid")
    assert reference > 1e-4
    assert low * reference <= abs(moved) < high * reference and (moved > 0 or start == "grid"), (reference, moved)


def test_fsdp_masters_from_a_16_bit_checkpoint_move_off_the_grid():
    # FSDP keeps fp32 parameters as its masters and computes in bf16 from them: read from a bf16
    # checkpoint they sit on the grid (gains included), and are dithered in place; fp32 values with
    # more precision are left as they are
    from helpers.tiny import tiny_model

    from minigrpo.optim import dither_onto_masters

    on_grid = tiny_model(seed=3, dtype=torch.bfloat16).float()
    full = tiny_model(seed=3)
    before = [p.detach().clone() for p in on_grid.parameters()]
    assert dither_onto_masters(on_grid.parameters(), torch.bfloat16) == len(before)
    for (name, p), b in zip(on_grid.named_parameters(), before):
        assert torch.equal(p.bfloat16(), b.bfloat16()) and not torch.equal(p, b), name  # compute weights kept
    weights = [p.detach().clone() for n, p in full.named_parameters() if "norm" not in n]
    assert dither_onto_masters(full.parameters(), torch.bfloat16) == len(before) - len(weights)  # gains: 1.0
    assert all(torch.equal(p, w) for p, w in zip([p for n, p in full.named_parameters() if "norm" not in n], weights))
    again = tiny_model(seed=3, dtype=torch.bfloat16).float()
    dither_onto_masters(again.parameters(), torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), on_grid.parameters()))  # every rank alike


def test_master_start_dither_ignores_the_checkpoint_values(tmp_path):
    masters: dict = {}
    model = load(tmp_path, "bfloat16", masters, train={"master_start": "dither"})
    assert masters == {}  # nothing read in fp32: every 16-bit master starts dithered
    optimizer = build_optimizer(model.parameters(), TrainCfg(), masters=masters)
    for p, m in zip(optimizer.params, optimizer.masters):
        assert torch.equal(m.to(p.dtype), p)
        assert p.dtype == torch.float32 or not torch.equal(m, p.float())
