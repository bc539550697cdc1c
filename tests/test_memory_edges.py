"""Memory pre-flight (memory.py) on configurations the other memory tests leave out: bitsandbytes' 8-bit
AdamW over every parameter (its rule: a tensor under min_8bit_size elements keeps fp32 state), FSDP's
units as distributed.shard_model makes them (each block's RMSNorm gains gathered in fp32, what a pass
without gradients leaves gathered), measured where the CPU allows it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import ranks_result
from helpers.tiny import tiny_model

from minigrpo.config import load_config
from minigrpo.memory import estimate_peak
from minigrpo.memory_parts import parameter_numels, value_model_bytes
from minigrpo.memory_ranks import block_params, fp32_gain_params, fsdp_gathered

# a tiny model whose linears are >= 4096 elements (8-bit state) and whose gains and biases are not
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
FAMILIES = {
    "llama": {},
    "qwen2-biases": dict(model_type="qwen2"),
    "qwen3-qk-norms": dict(model_type="qwen3", head_dim=32),
    "phi3-fused": dict(model_type="phi3", original_max_position_embeddings=256),
    "tied": dict(tie_word_embeddings=True),
}


def _bnb_state_bytes(params: list[torch.nn.Parameter]) -> int:
    """Device bytes of bitsandbytes' AdamW8bit state after one step over `params` (CPU backend), per
    parameter: state1 / state2 and their absmax; the two 256-entry quantisation maps (qmap1, qmap2) are
    one pair per optimizer, shared by every parameter, and left out (2 KiB)."""
    bnb = pytest.importorskip("bitsandbytes")
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    optimizer.step()
    states = [t for s in optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and "qmap" not in k]
    return sum(t.nbytes for t in states)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw8bit_state_counts_small_tensors_at_32_bits(family):
    """Full fine-tuning with train.optimizer=adamw8bit: bitsandbytes keeps the gains, biases (and q / k
    norms) in fp32 state, 8 bytes a value, and only tensors of >= 4096 values in uint8 with an fp32
    absmax per 256. The estimate counted every parameter as one 8-bit tensor: 3,816 bytes of the llama
    case's 1,020,160 missing (6,872 with Qwen2's q/k/v biases). Now equal to what bitsandbytes allocates."""
    model = tiny_model(**SMALL, **FAMILIES[family])
    params = list(model.parameters())
    assert sorted(parameter_numels(model.args)) == sorted(p.numel() for p in params)
    cfg = load_config(None, ["run.device=cpu", "train.optimizer=adamw8bit"])
    est = estimate_peak(cfg, model.args, prompt_tokens=8, device_type="cpu")
    assert est.parts["optimizer_state"] == _bnb_state_bytes(params)


def test_adamw8bit_state_of_a_separate_critic_counts_its_small_tensors_at_32_bits():
    """PPO's separate critic (the body without the LM head, plus a (1, D) fp32 head) under 8-bit AdamW:
    the head and the gains keep fp32 state, as bitsandbytes allocates it."""
    model = tiny_model(**SMALL, model_type="qwen2")
    body = [p for name, p in model.named_parameters() if not name.startswith("lm_head")]
    head = torch.nn.Parameter(torch.zeros(1, model.args.dim))
    cfg = load_config(None, ["run.device=cpu", "train.optimizer=adamw8bit", "algorithm=ppo"])
    critic = value_model_bytes(model.args, cfg, 4)
    assert critic["optimizer"] == _bnb_state_bytes([*body, head])


# ================================================================================================
# FSDP: what a rank gathers, read off a 2-rank gloo job on the CPU (this file is the ranks' entry point:
# `torchrun tests/test_memory_edges.py OUT`, rank 0 saving what it saw to OUT)

SHARDED = {  # case: (model overrides, distributed.reshard_after_forward, train.fp32_norms)
    "llama": ({}, True, True),
    "qwen3-kept-gathered": (dict(model_type="qwen3", head_dim=32), False, True),
    "llama-bf16-gains": ({}, True, False),
}


def _gathered_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a sharded model holds unsharded now: FSDP2 swaps a unit's DTensor shards
    for plain full tensors while it is gathered."""
    from torch.distributed.tensor import DTensor

    return sum(p.nbytes for p in model.parameters() if not isinstance(p, DTensor))


def _ranks_gathered() -> dict:
    """Per case, on a model sharded in bf16 as build_run shards it: the bytes full_weights gathers for
    sampling, the bytes gathered when a forward with gradients reaches the final norm, and what a
    forward without gradients leaves gathered."""
    import torch.distributed as dist

    from minigrpo.distributed import World, shard_model

    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))  # (N, T)
    out = {}
    for case, (overrides, reshard, fp32_norms) in SHARDED.items():
        model = tiny_model(1, **SMALL, **overrides).train()
        shard_model(model, world, compute_dtype=torch.bfloat16, reshard_after_forward=reshard, fp32_norms=fp32_norms)
        out[case] = _seen_gathered(model, ids)
    return out


def _seen_gathered(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """_ranks_gathered's three measurements on one sharded model."""
    import torch.distributed as dist
    from helpers.rollouts import full_rollout

    from minigrpo.distributed import World, full_weights
    from minigrpo.step import logprobs_phase

    seen = {}
    with full_weights(model) as view:
        seen["sampling"] = sum(p.nbytes for p in view.parameters())

    def at_norm(*_) -> None:  # returns None: the norm's input is left as it is
        seen.setdefault("at_norm", _gathered_bytes(model))

    hook = model.model.norm.register_forward_pre_hook(at_norm)
    model(ids).float().sum().backward()
    hook.remove()
    with torch.no_grad():
        model(ids)
    seen["left"] = _gathered_bytes(model)  # a bare pass without gradients: units wait for a backward
    rollout = full_rollout(1, 2, 3, 3, vocab=100, generator=torch.Generator().manual_seed(1))
    logprobs_phase(model, rollout, 2, 1.0, world=World(rank=dist.get_rank(), size=dist.get_world_size()))
    seen["after_logprobs"] = _gathered_bytes(model)  # the step's passes give them back
    return seen


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> dict:
    """What rank 0 of a 2-rank gloo job saw, per case."""
    return ranks_result(Path(__file__), tmp_path_factory.mktemp("fsdp") / "gathered.pt")


def _sharded_cfg(case: str, *extra: str):
    _, reshard, fp32_norms = SHARDED[case]
    flags = [f"distributed.reshard_after_forward={str(reshard).lower()}", f"train.fp32_norms={str(fp32_norms).lower()}"]
    return load_config(None, ["run.dtype=bfloat16", *flags, *extra])


@pytest.mark.parametrize("case", sorted(SHARDED))
def test_fsdp_gathered_units_are_what_the_ranks_gather(gathered, case):
    """Under bf16 FSDP with train.fp32_norms each block's gains (and the final norm's) are a unit gathered
    in fp32 and kept gathered until their backward. The estimate counted every unit in bf16 (sampling
    2 bytes a parameter: the gains' 2 more each missing) and nothing left gathered by a pass without
    gradients (the gains, and with blocks not resharded every block: the frozen reference keeps them
    for the whole run). Now each equals the bytes the ranks hold gathered."""
    args, seen = tiny_model(**SMALL, **SHARDED[case][0]).args, gathered[case]
    cfg = _sharded_cfg(case)
    est = fsdp_gathered(args, cfg, 2)
    assert est["sampling"] == seen["sampling"]
    gains, _ = fp32_gain_params(args, cfg, 2)
    in_flight = 2 * 2 * (block_params(args) - gains) if cfg.distributed.reshard_after_forward else 0
    assert est["forward"] - in_flight == seen["at_norm"]  # at the final norm no block is in flight
    # a bare pass without gradients leaves the fp32 gain units (and blocks kept gathered) for a backward
    # that a frozen reference never makes; the step's log-prob passes give everything back
    assert (seen["left"] > 0) == cfg.train.fp32_norms and seen["after_logprobs"] == 0


if __name__ == "__main__":  # a rank of the gloo job the `gathered` fixture starts
    import torch.distributed as dist

    dist.init_process_group("gloo")
    result = _ranks_gathered()
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[1])
    dist.destroy_process_group()
