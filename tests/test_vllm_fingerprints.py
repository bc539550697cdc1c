"""Fingerprints of vLLM's fused parameters, block by block, without vLLM: a stand-in engine whose model
stacks q/k/v and gate/up into one parameter each, as vLLM's GPU models do (`packed_modules_mapping`).
The CPU backend repacks every linear weight, so the real engine in test_vllm_sampler.py never shows
a fused block that can be fingerprinted; these tests hold the logic that the GPU relies on (and the
GPU's wake order: torch's cached blocks go back before vLLM maps its memory again)."""

from __future__ import annotations

import torch
from helpers.tiny import tiny_model
from torch import nn

from minigrpo.sampling.vllm_sync import (
    fingerprintable,
    fingerprints,
    packed_rows,
    policy_weights_for_sync,
    stale_tensors,
    wake_engine,
    worker_fingerprints,
)

MAPPING = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class FusedModel(nn.Module):
    """The policy's weights as vLLM's GPU models hold them: fused projections stacked along dim 0."""

    packed_modules_mapping = MAPPING

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        pushed = dict(policy_weights_for_sync(policy))
        self.names: list[str] = []
        for name, t in pushed.items():
            for fused, parts in MAPPING.items():
                if f".{parts[0]}." in name:  # the first part stands for the fused parameter
                    name = name.replace(parts[0], fused)
                    t = torch.cat([pushed[name.replace(fused, p)] for p in parts])
            if any(f".{p}." in name for parts in MAPPING.values() for p in parts[1:]):
                continue
            self.register_parameter(name.replace(".", "__"), nn.Parameter(t.clone(), requires_grad=False))
            self.names.append(name)

    def named_parameters(self, *args, **kwargs):  # vLLM's dotted names
        for name in self.names:
            yield name, getattr(self, name.replace(".", "__"))


class Engine:
    """What the sync code calls on vllm.LLM: collective_rpc runs a worker function in-process."""

    def __init__(self, model: nn.Module) -> None:
        runner = type("Runner", (), {"get_model": lambda _self: model})()
        self.worker = type("Worker", (), {"model_runner": runner})()

    def collective_rpc(self, fn, args=()):
        return [fn(self.worker, *args)]


def _shapes(policy: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in policy_weights_for_sync(policy)}


def test_fused_blocks_are_fingerprinted_and_a_change_in_one_is_caught():
    policy = tiny_model(seed=3)
    engine_model = FusedModel(policy)
    engine, shapes = Engine(engine_model), _shapes(policy)
    kept = fingerprintable(engine, policy, shapes, torch.float32)
    assert list(kept) == list(shapes)  # every pushed tensor, the fused ones block by block
    assert stale_tensors(engine, policy, kept, torch.float32) == []

    # one element of layer 1's k block (rows 64..95 of its qkv_proj) moves as a small update would
    qkv = dict(engine_model.named_parameters())["model.layers.1.self_attn.qkv_proj.weight"]
    qkv.data[64 + 5, 7] += 1e-4
    assert stale_tensors(engine, policy, kept, torch.float32) == ["model.layers.1.self_attn.k_proj.weight"]


def test_a_fused_block_in_another_layout_is_left_to_the_probe():
    """Rows of layer 0's gate_up stored interleaved (a repacked layout): its blocks do not equal what
    was pushed at the first sync, so they are not fingerprinted; everything else is."""
    policy = tiny_model(seed=4)
    engine_model = FusedModel(policy)
    gate_up = dict(engine_model.named_parameters())["model.layers.0.mlp.gate_up_proj.weight"]  # (256, 64)
    gate_up.data.copy_(gate_up.data.view(2, 128, 64).transpose(0, 1).reshape(256, 64))
    shapes = _shapes(policy)
    kept = fingerprintable(Engine(engine_model), policy, shapes, torch.float32)
    left = set(shapes) - set(kept)
    assert left == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}


def test_a_stored_parameter_that_differs_at_the_first_sync_is_kept_so_the_check_fails():
    policy = tiny_model(seed=5)
    engine_model = FusedModel(policy)
    dict(engine_model.named_parameters())["model.norm.weight"].data[0] += 1.0
    engine, shapes = Engine(engine_model), _shapes(policy)
    kept = fingerprintable(engine, policy, shapes, torch.float32)
    assert "model.norm.weight" in kept
    assert stale_tensors(engine, policy, kept, torch.float32) == ["model.norm.weight"]


def test_packed_rows_needs_every_part_pushed_and_room_for_them():
    qkv = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    params = {"l.0.attn.qkv_proj.weight": qkv}
    full = {"l.0.attn.q_proj.weight": (6, 4), "l.0.attn.k_proj.weight": (3, 4), "l.0.attn.v_proj.weight": (3, 4)}
    blocks = packed_rows(params, MAPPING, full)
    assert list(blocks) == list(full)
    k = blocks["l.0.attn.k_proj.weight"]
    assert torch.equal(k, qkv[6:9]) and k.data_ptr() == qkv[6:].data_ptr()  # a view, no copy
    missing = {k: v for k, v in full.items() if "v_proj" not in k}
    assert packed_rows(params, MAPPING, missing) == {}
    too_big = {**full, "l.0.attn.v_proj.weight": (4, 4)}
    assert packed_rows(params, MAPPING, too_big) == {}
    other_width = {**full, "l.0.attn.v_proj.weight": (3, 5)}
    assert packed_rows(params, MAPPING, other_width) == {}
    model = type("M", (), {"named_parameters": lambda _s: params.items(), "packed_modules_mapping": MAPPING})()
    names, fps = worker_fingerprints(Engine(model).worker, full)
    assert names == list(full) and torch.equal(fps[1], fingerprints([("k", qkv[6:9].clone())])[1][0])


def test_waking_on_the_gpu_first_returns_torchs_cached_blocks(monkeypatch):
    calls = []

    class Engine:
        def wake_up(self, tags=None):
            calls.append(("wake", tags))

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    wake_engine(Engine(), torch.device("cuda", 0), ["kv_cache"])
    assert calls == [("empty_cache",), ("wake", ["kv_cache"])]
    calls.clear()
    wake_engine(Engine(), torch.device("cpu"))  # the CPU backend: nothing cached to return
    assert calls == [("wake", None)]
