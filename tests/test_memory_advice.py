"""Memory pre-flight (memory.py): what a refusal says and whether following it works.

Every setting it names, applied as `--set key=value` on the same config, loads and fits by the same
estimate; when no single one fits it names a set that fits together (or says that none does, never a
setting that does not apply); settings that need a missing package are not named; the message is one
line with readable units; and the static parts of a bf16 model trained in full (its RMSNorm gains kept
fp32) are counted to the byte.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_config, tiny_model

from minigrpo import memory
from minigrpo.config import load_config
from minigrpo.memory import MemoryPreflightError, estimate_peak, preflight, suggest_fixes
from minigrpo.memory_estimate import format_bytes
from minigrpo.memory_knobs import config_errors
from minigrpo.models.args import ModelArgs
from minigrpo.models.loading import build_random
from minigrpo.models.presets import preset_config
from minigrpo.optim import build_optimizer

CONFIGS = Path(__file__).parents[1] / "configs"
QWEN = CONFIGS / "qwen2.5-1.5b_gsm8k.yaml"
GiB = 2**30
BASE = ["grpo.prompts_per_step=8", "grpo.group_size=8", "train.micro_batch_size=8", "sampler.max_new_tokens=2048"]
MODES = {
    "full": [],
    "reference": ["grpo.beta=0.04"],
    "lora": ["lora.enabled=true"],
    "qlora": ["lora.enabled=true", "lora.quantize_base=nf4"],
    "vllm": ["sampler.kind=vllm", "sampler.gpu_memory_utilization=0.3"],
    "ppo": ["algorithm=ppo", "grpo.beta=0", "ppo.mini_batches=2"],
}


def _args(preset: str) -> ModelArgs:
    return ModelArgs.from_hf_config(preset_config(preset))


def _applied(overrides: list[str], changes: dict) -> list[str]:
    return [*overrides, *(f"{key}={memory._show(value)}" for key, value in changes.items())]


@pytest.mark.parametrize("preset,world", [("qwen2.5-0.5b", 1), ("smollm2-135m", 2), ("qwen3-0.6b", 4)])
def test_every_refusal_names_settings_that_load_and_fit(preset, world):
    """A grid of modes x budgets (30/60/90% of the peak) x ranks: each single change loads (config rules and
    the launch's) and its stated total is the estimate of the loaded config, under budget; without one,
    the named set loads and its stated total is that of all of it applied at once."""
    args, kw = _args(preset), dict(prompt_tokens=256, device_total=80 * GiB, world_size=world)
    together = 0
    for (mode, over), share in itertools.product(MODES.items(), (0.3, 0.6, 0.9)):
        overrides = [*BASE, *over]
        cfg = load_config(QWEN, overrides)
        budget = int(estimate_peak(cfg, args, **kw).total * share)
        found = suggest_fixes(cfg, args, budget=budget, **kw)
        for key, _, new, total in found:
            changed = load_config(QWEN, _applied(overrides, {key: new}))
            assert not config_errors(changed, "train", world), (mode, key)
            assert estimate_peak(changed, args, **kw).total == total <= budget, (mode, key)
        if not found:
            kept, total = found.together
            changed = load_config(QWEN, _applied(overrides, kept))
            assert not config_errors(changed, "train", world), (mode, kept)
            assert estimate_peak(changed, args, **kw).total == total, (mode, kept)
            together += total <= budget
    assert together >= 1  # the grid holds refusals that only a combination fixes


def test_no_single_fix_names_a_set_that_fits_together():
    """Qwen2.5-0.5B in full, 64 rows x 2304 tokens, on 30% of its peak: no one setting fits. The refusal
    once listed every knob the pre-flight knows ("combine several of: sampler.gpu_memory_utilization,
    sampler.vllm_sleep, ..., env.max_episode_tokens", vLLM and episode settings of a run with neither);
    it now names the set that fits, which loads and fits when passed as one `--set`."""
    args, overrides = _args("qwen2.5-0.5b"), [*BASE]
    cfg = load_config(QWEN, overrides)
    need = estimate_peak(cfg, args, prompt_tokens=256).total
    free = int(need * 0.3 / 0.95)
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, args, "cuda", 256, free_bytes=free, verbose=False)
    msg = str(err.value)
    assert "\n" not in msg and "No single setting fits; together these would (" in msg, msg
    for absent in ("sampler.gpu_memory_utilization", "sampler.vllm_sleep", "env.max_episode_tokens", "combine"):
        assert absent not in msg, absent
    sets = msg.split("--set ")[1].split()
    changed = load_config(QWEN, [*overrides, *sets])
    assert estimate_peak(changed, args, prompt_tokens=256).total <= int(free * 0.95)
    assert "model.gradient_checkpointing=true" in sets


def test_a_device_that_cannot_fit_the_step_is_named_as_such():
    """No free memory at all: nothing the pre-flight can change fits; the refusal says so in one line (and
    what came closest), not a list of knobs. A negative free size is a caller's mistake."""
    args, cfg = _args("qwen2.5-0.5b"), load_config(QWEN, BASE)
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, args, "cuda", 256, free_bytes=0, verbose=False)
    msg = str(err.value)
    assert "\n" not in msg and "has 0 B free" in msg and "No setting change fits: even --set " in msg, msg
    with pytest.raises(ValueError, match="free_bytes must be >= 0"):
        preflight(cfg, args, "cuda", 256, free_bytes=-1, verbose=False)
    with pytest.raises(ValueError, match="margin in"):
        preflight(cfg, args, "cuda", 256, free_bytes=GiB, margin=1.0, verbose=False)


def test_settings_that_need_bitsandbytes_are_named_only_when_it_is_installed(monkeypatch):
    """A LoRA run whose peak NF4 base weights or 8-bit AdamW would bring under budget: without
    bitsandbytes neither is proposed (the run would stop at its package check: `lora.quantize_base=nf4
    needs the package bitsandbytes`); once it was, on any machine."""
    args = _args("llama-3.1-8b")
    over = [*BASE, "lora.enabled=true", "model.gradient_checkpointing=true", "train.micro_batch_size=1"]
    cfg = load_config(QWEN, [*over, "sampler.max_new_tokens=256", "grpo.prompts_per_step=1"])
    budget = int(estimate_peak(cfg, args, prompt_tokens=256).total * 0.9)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: real(name, *a) if name != "bitsandbytes" else None
    )
    keys = [key for key, *_ in suggest_fixes(cfg, args, prompt_tokens=256, budget=budget)]
    assert "lora.quantize_base" not in keys and "train.optimizer" not in keys, keys
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name)
    )
    keys = [key for key, *_ in suggest_fixes(cfg, args, prompt_tokens=256, budget=budget)]
    assert "lora.quantize_base" in keys, keys


@pytest.mark.parametrize(
    "n,shown",
    [
        *((0, "0 B"), (512, "512 B"), (3 * 1024, "3.0 KiB"), (int(65.4 * 2**20), "65.4 MiB")),
        *((int(59.8 * GiB), "59.8 GiB"), (int(1.5 * 2**40), "1.5 TiB"), (5000 * 2**40, "5000.0 TiB")),
        (-2048, "-2.0 KiB"),
    ],
)
def test_bytes_read_in_the_unit_that_fits_them(n, shown):
    assert format_bytes(n) == shown


def test_refusal_of_a_tiny_and_a_huge_step_is_one_line_in_readable_units():
    """The tiny-llama preset on 1 MiB, and Llama-3.1-8B in full with 64 rows of 32k tokens: the numbers
    read as KiB / MiB and TiB, not "0.0 GiB" or "2345.6 GiB"."""
    tiny = ModelArgs.from_hf_config(preset_config("tiny-llama"))
    cfg = load_config(None, ["grpo.prompts_per_step=2", "grpo.group_size=2", "train.micro_batch_size=4"])
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, tiny, "cpu", 16, free_bytes=2**20, verbose=False)
    msg = str(err.value)
    assert "\n" not in msg and " MiB at its peak (" in msg and "has 1.0 MiB free (972.8 KiB usable" in msg, msg
    assert "0.0 GiB" not in msg and " KiB" in msg.split("Largest parts")[1]
    huge = load_config(QWEN, [*BASE, "sampler.max_new_tokens=32768"])
    with pytest.raises(MemoryPreflightError) as err:
        preflight(huge, _args("llama-3.1-8b"), "cuda", 256, free_bytes=80 * GiB, verbose=False)
    assert " TiB at its peak (update phase)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_full_finetuning_static_bytes_are_exact(family):
    """train.fp32_norms (the default): a bf16 model trained in full keeps its RMSNorm gains (and their
    gradients) in fp32. Weights, gradients, fp32 masters and AdamW state of a built model after one step
    equal the estimate to the byte; the gains were once counted in bf16 (640 bytes short on tiny-llama's
    weights, as much on its gradients: 0.5 MiB each on Llama-3.1-8B)."""
    over = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32} if family == "qwen3" else {}
    model = build_random(tiny_config(**over), dtype=torch.bfloat16, seed=0)
    model.norms_in_fp32()  # as build.load_policy does with train.fp32_norms
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in model.parameters())
    cfg = load_config(None, ["run.device=cpu", "run.dtype=bfloat16"])
    optimizer = build_optimizer(model.parameters(), cfg.train)
    optimizer.step()
    masters = sum(m.nbytes for m in optimizer.masters)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if t.ndim > 0)
    est = estimate_peak(cfg, model.args, prompt_tokens=8, device_type="cpu")
    assert (est.parts["weights"], est.parts["gradients"]) == (weights, grads)
    assert (est.parts["master_weights"], est.parts["optimizer_state"]) == (masters, state)


def test_bf16_separate_critic_weights_are_exact():
    """PPO's separate critic copies the policy's body with fp32 gains too (value_model.build_value_model)."""
    from minigrpo.algorithms.value_model import build_critic
    from minigrpo.memory_parts import value_model_bytes

    policy = tiny_model(dtype=torch.bfloat16)
    cfg = load_config(None, ["run.device=cpu", "run.dtype=bfloat16", "algorithm=ppo", "grpo.beta=0"])
    critic = build_critic(cfg, policy, torch.device("cpu"), torch.bfloat16, total_steps=10)
    weights = sum(p.nbytes for p in critic.model.trainable_parameters())
    assert value_model_bytes(policy.args, cfg, 2)["weights"] == weights


@pytest.mark.parametrize(
    "overrides,budget_gib",
    [
        (["grpo.prompts_per_step=16", "grpo.group_size=16", "train.micro_batch_size=16"], 30),
        (["grpo.prompts_per_step=512", "grpo.group_size=64", "train.micro_batch_size=64"], 60),
    ],
)
def test_a_set_that_keeps_the_computation_is_found_when_the_peak_moves(overrides, budget_gib):
    """Qwen2.5-1.5B in full with long completions: the step's peak moves from the update to the rollout once
    checkpointing and smaller passes cut the update, so sampler.max_rows, which does not lower the first
    peak, is what fits next. The search once tried only the changes that lowered the first peak and named
    the optimizer, LoRA and one prompt a step (or said nothing fits at 1.0 TiB); now the set keeps what a
    step computes and fits."""
    args = _args("qwen2.5-1.5b")
    over = ["sampler.max_new_tokens=4096" if budget_gib == 30 else "sampler.max_new_tokens=8192", *overrides]
    cfg = load_config(QWEN, [*over, "model.gradient_checkpointing=false"])
    found = suggest_fixes(cfg, args, budget=budget_gib * GiB, prompt_tokens=256, device_type="cuda")
    assert not found, found  # no single change fits
    kept, total = found.together
    assert total <= budget_gib * GiB, (kept, format_bytes(total))
    assert set(kept) <= {"model.gradient_checkpointing", "model.activation_offload", "train.micro_batch_size",
                         "sampler.max_rows"}, kept  # fmt: skip
    applied = load_config(QWEN, _applied([*over, "model.gradient_checkpointing=false"], kept))
    assert estimate_peak(applied, args, prompt_tokens=256).total == total


def test_when_only_changes_of_the_step_fit_alone_a_set_that_keeps_it_is_named_too():
    """Qwen2.5-1.5B in full, 16 x 16 rows of 4096 tokens, on 40 GiB: alone, only a shorter completion or
    fewer prompts fit (each changes what a step computes), while checkpointing, smaller passes and fewer
    rows at once fit together and compute the same step: the refusal names that set as well."""
    args = _args("qwen2.5-1.5b")
    over = ["grpo.prompts_per_step=16", "grpo.group_size=16", "train.micro_batch_size=16"]
    over += ["sampler.max_new_tokens=4096", "model.gradient_checkpointing=false"]
    cfg = load_config(QWEN, over)
    found = suggest_fixes(cfg, args, budget=40 * GiB, prompt_tokens=256, device_type="cuda")
    assert found and all(key in ("sampler.max_new_tokens", "grpo.prompts_per_step", "grpo.group_size")
                         for key, *_ in found), found  # fmt: skip
    kept, total = found.together
    assert total <= 40 * GiB and set(kept) <= {"model.gradient_checkpointing", "train.micro_batch_size",
                                               "sampler.max_rows"}, kept  # fmt: skip
    assert estimate_peak(load_config(QWEN, _applied(over, kept)), args, prompt_tokens=256).total == total
    need = estimate_peak(cfg, args, prompt_tokens=256).total
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, args, "cuda", 256, free_bytes=int(40 * GiB / 0.95), verbose=False)
    msg = str(err.value)
    assert need > 40 * GiB and "\n" not in msg and "; or, computing the same step, together (" in msg, msg
