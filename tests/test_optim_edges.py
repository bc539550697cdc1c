"""Optimizer states that do not fit the run resuming them: parameters frozen or unfrozen since the save
(the error names each side's parameters), and fp32 masters of other names or shapes (refused before any
is copied into the weights)."""

from __future__ import annotations

import pytest
import torch

from minigrpo.config import TrainCfg
from minigrpo.optim import build_optimizer
from minigrpo.optim_state import load_masters, load_optimizer_state, optimizer_state


class _Three(torch.nn.Module):
    """A matrix, a vector and another matrix (both groups of a decaying AdamW)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(3, 2, generator=gen).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(3, generator=gen).to(dtype))
        self.c = torch.nn.Parameter(torch.randn(2, 2, generator=gen).to(dtype))


def _stepped_state(model: torch.nn.Module, cfg: TrainCfg) -> dict:
    opt = build_optimizer(model.parameters(), cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    return optimizer_state(model, opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("frozen_then", "frozen_now", "named"),
    [
        ((), ("c",), r"saved, not trainable here: c \("),
        (("c",), (), r"trainable here, not saved: c \("),
        (("b",), ("c",), r"trainable here, not saved: b; saved, not trainable here: c \("),
    ],
    ids=["frozen", "unfrozen", "both"],
)
def test_a_state_of_other_trainable_parameters_names_each_side(dtype, frozen_then, frozen_now, named):
    """A parameter frozen (or unfrozen) between the saving run and the resuming one: one line that says
    which parameters the checkpoint holds a state for that are not trainable here and which trainable
    ones it has none for (before: `missing [], unexpected ['c']`, which did not say whose), and nothing
    loads: the weights and the fresh optimizer stay as they were."""
    cfg = TrainCfg(lr=0.1, weight_decay=0.1)
    saved_model = _Three(dtype)
    for name in frozen_then:
        getattr(saved_model, name).requires_grad_(False)
    saved = _stepped_state(saved_model, cfg)
    model = _Three(dtype)
    for name in frozen_now:
        getattr(model, name).requires_grad_(False)
    opt = build_optimizer(model.parameters(), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prefix = "the checkpoint's optimizer state is for other parameters: "
    with pytest.raises(ValueError, match=rf"^{prefix}{named}") as caught:
        load_optimizer_state(model, opt, saved)
    assert "\n" not in str(caught.value)
    assert not opt.state and opt.param_groups[0]["lr"] == 0.1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_many_differing_names_are_counted_not_listed():
    """Past three names on one side the line says how many more there are."""
    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    saved_model = torch.nn.Sequential(*layers)
    saved = _stepped_state(saved_model, TrainCfg(lr=0.1))
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)]).requires_grad_(False)
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"saved, not trainable here: 0\.bias, 1\.weight, 1\.bias and 2 more \("):
        load_optimizer_state(model, build_optimizer(model.parameters(), TrainCfg(lr=0.1)), saved)


@pytest.mark.parametrize(
    ("masters", "named"),
    [
        ({"a": torch.arange(2.0).reshape(1, 2)}, r"a is \(3, 2\) here, \(1, 2\) saved$"),
        ({"c": torch.ones(2, 2), "z": torch.zeros(3)}, r"z is no parameter here$"),
    ],
    ids=["other_shape", "other_name"],
)
def test_fp32_masters_of_other_parameters_are_refused_before_any_is_copied(masters, named):
    """FSDP resumes copy a checkpoint's fp32 masters into the unsharded parameters before the optimizer
    state's own shape check runs: a (1, 2) master was broadcast over a (3, 2) weight without a word and
    an unknown name was a bare KeyError. Now one ValueError naming the parameter, and no weight moved
    (not even c, whose master fits)."""
    model = _Three()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"^the checkpoint's fp32 masters are for other parameters: {named}"):
        load_masters(model, {"masters": masters})
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_fp32_masters_that_fit_are_copied_exactly():
    """The masters of every parameter, of its shape: each becomes its parameter bit for bit."""
    model = _Three()
    masters = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for n, p in model.named_parameters()}
    load_masters(model, {"masters": masters})
    for name, p in model.named_parameters():
        assert torch.equal(p, masters[name]), name
