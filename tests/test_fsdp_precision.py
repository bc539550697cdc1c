"""FSDP2 under a 16-bit compute dtype keeps the RMSNorm gains fp32 where they run, as one process
does (train.fp32_norms, Transformer.norms_in_fp32): two gloo ranks on the CPU against one process on
the same batch, for a Llama block (checkpointed: recomputed blocks gather again) and a Qwen3 block
(four norms: q/k norms inside attention).

This file is also the ranks' entry point (`torchrun tests/test_fsdp_precision.py OUT`): rank 0 saves
what the ranks saw to OUT.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.cli import ranks_result
from helpers.tiny import tiny_model

from minigrpo.distributed import fsdp_units, full_state_dict, full_tensor, full_weights, shard_range
from minigrpo.models.transformer import RMSNorm

CASES = {
    "llama-checkpointed": ({}, True),
    "qwen3-qk-norms": ({"model_type": "qwen3", "head_dim": 24}, False),
}
LR = 1e-5  # an RL learning rate: far below bf16's step near 1 (2^-7)
ROWS, LENGTH = 4, 7


def start_model(case: str) -> torch.nn.Module:
    """A tiny fp32 model whose gains lie off the bf16 grid (as an fp32 checkpoint's trained gains) and
    whose other weights lie on it, so a bf16 forward of its fp32 shards computes exactly what one
    process's bf16 model does."""
    overrides, checkpointing = CASES[case]
    model = tiny_model(1, **overrides).train()
    model.gradient_checkpointing = checkpointing
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    p.copy_(1 + 0.05 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(p.to(torch.bfloat16).float())
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 100, (ROWS, LENGTH), generator=torch.Generator().manual_seed(3))  # (N, T)


def summed_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The next-token NLL summed over rows and tokens: the ranks' losses add up to one process's."""
    logits = model(ids).float()  # (N, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


@contextmanager
def gains_seen(model: torch.nn.Module):
    """{norm name: the gain (fp32 copy) and its dtype} as each RMSNorm's forward receives it."""
    seen: dict[str, tuple[torch.Tensor, torch.dtype]] = {}

    def record(name, module, _args):
        seen[name] = (module.weight.detach().float().clone(), module.weight.dtype)

    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: record(n, mod, args))
        for n, m in model.named_modules()
        if isinstance(m, RMSNorm)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def gain_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, RMSNorm)]


def _ranks_run(case: str) -> dict:
    """One training step of `case` sharded over the ranks in bf16, each rank on its share of the rows
    (after a forward without gradients, in one-row micro-batches)."""
    import torch.distributed as dist

    from minigrpo.distributed import World, shard_model

    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    model, ids = start_model(case), batch()
    shard_model(model, world, compute_dtype=torch.bfloat16)
    params = dict(model.named_parameters())  # the sharded ones (DTensors)
    lo, hi = shard_range(ROWS, world.rank, world.size)
    with torch.no_grad():  # as the old log-probs: the gains stay gathered into the first micro-batch
        model(ids[lo:hi])
    total = torch.zeros(())
    with gains_seen(model) as before:
        for row in range(lo, hi):  # one-row micro-batches: the gradients accumulate
            loss = summed_nll(model, ids[row : row + 1])
            loss.backward()
            total += loss.detach()
    dist.all_reduce(total)
    grads = {n: full_tensor(params[f"{n}.weight"].grad).clone() for n in gain_names(model)}
    torch.optim.AdamW(model.parameters(), lr=LR).step()
    with gains_seen(model) as after, torch.no_grad():
        model(ids[lo:hi])
    with full_weights(model) as view:
        view_dtypes = {n: p.dtype for n, p in view.named_parameters()}
    return {
        "loss": float(total),
        "dtypes": {n: dtype for n, (_, dtype) in before.items()},
        "grads": grads,
        "before": {n: gain for n, (gain, _) in before.items()},
        "after": {n: gain for n, (gain, _) in after.items()},
        "view_dtypes": view_dtypes,
        "state": full_state_dict(model, world),
    }


def _ranks_structure() -> dict:
    """Units and the gains' dtype in the forward for fp32 compute and for train.fp32_norms off; a
    frozen model's (the reference policy) logits."""
    import torch.distributed as dist

    from minigrpo.distributed import World, shard_model

    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    out = {}
    for name, dtype, fp32_norms in (("fp32", torch.float32, True), ("bf16-gains", torch.bfloat16, False)):
        model = start_model("llama-checkpointed")
        shard_model(model, world, compute_dtype=dtype, fp32_norms=fp32_norms)
        with gains_seen(model) as seen, torch.no_grad():
            model(batch())
        out[name] = {"units": len(fsdp_units(model)), "dtypes": {n: d for n, (_, d) in seen.items()}}
    frozen = start_model("qwen3-qk-norms").eval().requires_grad_(False)  # a reference policy
    shard_model(frozen, world, compute_dtype=torch.bfloat16)
    with gains_seen(frozen) as seen, torch.no_grad():
        logits = frozen(batch())
    out["frozen"] = {"dtypes": {n: d for n, (_, d) in seen.items()}, "logits": logits}
    return out


def one_process_run(case: str) -> dict:
    """The same step in one process: bf16 weights, fp32 gains (lower_precision keeps them)."""
    model, ids = start_model(case), batch()
    model.lower_precision(torch.bfloat16, keep_gains=True)
    with gains_seen(model) as before:
        loss = summed_nll(model, ids)
        loss.backward()
    gains = {n: model.get_submodule(n).weight for n in gain_names(model)}
    grads = {n: g.grad.clone() for n, g in gains.items()}
    torch.optim.AdamW(gains.values(), lr=LR).step()
    return {
        "loss": float(loss.detach()),
        "dtypes": {n: d for n, (_, d) in before.items()},
        "grads": grads,
        "after": gains,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """What rank 0 of a 2-rank gloo job saw, per case."""
    return ranks_result(Path(__file__), tmp_path_factory.mktemp("fsdp") / "ranks.pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_bf16_runs_its_gains_in_fp32_like_one_process(ranks, case):
    """Every gain reaches its norm in fp32 (before: bf16, so train.fp32_norms had no effect under
    FSDP); the first loss is one process's within 1e-5 relative (the same bf16 arithmetic; before:
    2e-4..6e-4 off, the gains rounded), and so are the gains' gradients within 1e-3 (before: 2.5e-2)."""
    sharded, one = ranks[case], one_process_run(case)
    assert set(sharded["dtypes"].values()) == {torch.float32}, sharded["dtypes"]
    assert sharded["dtypes"] == one["dtypes"]
    assert sharded["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, g in one["grads"].items():
        err = float((sharded["grads"][name] - g).abs().max() / g.abs().max())
        assert err < 1e-3, f"{name}: gradient {err:.3g} off (relative to its largest element)"


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_lr_sized_step_moves_the_sharded_gains_as_one_process(ranks, case):
    """AdamW at lr 1e-5 moves every gain by ~1e-5: the gain the next forward runs with moved and equals
    one process's (before: the bf16 gather rounded the step away, the gains ran unchanged, 3.7e-3
    from one process's)."""
    sharded, one = ranks[case], one_process_run(case)
    for name, gain in one["after"].items():
        moved = float((sharded["after"][name] - sharded["before"][name]).abs().min())
        assert moved > LR / 2, f"{name}: the gain the forward runs with moved only {moved:.3g}"
        diff = float((sharded["after"][name] - gain.detach()).abs().max())
        assert diff < 1e-7, f"{name}: {diff:.3g} from one process's gain after the step"


def test_gathered_weights_and_saved_state_keep_the_gains_fp32(ranks):
    """full_weights (the sampler's view): fp32 gains, bf16 matmul weights; the gathered state dict
    (what rank 0 saves): one process's keys, fp32 values, the gains exactly those the forward ran."""
    sharded = ranks["qwen3-qk-norms"]
    one = start_model("qwen3-qk-norms")
    gains = {f"{n}.weight" for n in gain_names(one)}
    assert len(gains) == 2 * 4 + 1
    for name, dtype in sharded["view_dtypes"].items():
        assert dtype == (torch.float32 if name in gains else torch.bfloat16), name
    assert sharded["state"].keys() == one.state_dict().keys()
    assert {t.dtype for t in sharded["state"].values()} == {torch.float32}
    for name in gain_names(one):
        assert torch.equal(sharded["state"][f"{name}.weight"], sharded["after"][name]), name


def test_fp32_compute_and_bf16_gains_keep_one_unit_per_block(ranks):
    """Nothing changes where the gains need no unit of their own: fp32 compute (2 blocks + root, fp32
    gains), and train.fp32_norms off (the gains run in bf16, as one process without it)."""
    structure = ranks["structure"]
    assert structure["fp32"]["units"] == structure["bf16-gains"]["units"] == 3
    assert set(structure["fp32"]["dtypes"].values()) == {torch.float32}
    assert set(structure["bf16-gains"]["dtypes"].values()) == {torch.bfloat16}


def test_a_sharded_frozen_reference_runs_its_gains_in_fp32(ranks):
    """A frozen copy (the reference policy of full fine-tuning) computes one process's logits."""
    frozen = ranks["structure"]["frozen"]
    assert set(frozen["dtypes"].values()) == {torch.float32}
    one = start_model("qwen3-qk-norms").eval()
    one.lower_precision(torch.bfloat16, keep_gains=True)
    with torch.no_grad():
        expected = one(batch())  # (N, T, V)
    assert torch.equal(frozen["logits"], expected), float((frozen["logits"] - expected).abs().max())


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = {case: _ranks_run(case) for case in CASES}
    results["structure"] = _ranks_structure()
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.destroy_process_group()


@pytest.mark.parametrize("fp32_norms", [True, False])
def test_fsdp_dithers_the_gains_only_where_they_run_in_16_bits(fp32_norms):
    """FSDP's fp32 parameters are the masters, dithered off the bf16 grid where they compute in bf16; gains
    that run in fp32 (train.fp32_norms) keep the checkpoint's values, as on one process (dithered, a gain of
    1.0 moved by up to 0.4% and the first step's metrics parted from one process's)."""
    from minigrpo.build import low_precision_masters
    from minigrpo.optim import dither_onto_masters

    model = tiny_model(1)
    gains = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # a bf16 checkpoint: every value on the grid
    before = {id(p): p.clone() for p in model.parameters()}
    dither_onto_masters(low_precision_masters(model, fp32_norms), torch.bfloat16)
    assert all(torch.equal(g, before[id(g)]) for g in gains) == fp32_norms
    linears = [p for p in model.parameters() if all(p is not g for g in gains)]
    assert linears and not any(torch.equal(p, before[id(p)]) for p in linears)
