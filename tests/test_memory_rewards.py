"""Reward models in the memory pre-flight (memory_rewards.py, memory.py).

A `reward_model` reward keeps its checkpoint on its device for the whole run: its weights are held in
every phase of a step, its scoring forward has a phase of its own. On the CPU the weights a tiny
reward model (saved by transformers) holds once loaded must equal the count to the byte, and the
peak of a real scoring call (AllocationTracker) must lie within 2% of the estimate. The GPU-side
counts read a 7B reward model's config.json alone (no weights needed): 14.1 GB the pre-flight must
see, in every phase, and advice that names the reward model's settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.allocations import AllocationTracker
from helpers.tiny import WORDS, tiny_tokenizer

from minigrpo import memory
from minigrpo.config import RewardSpec, load_config
from minigrpo.memory import MemoryPreflightError, estimate_peak, preflight
from minigrpo.memory_rewards import reward_model_weight_bytes, reward_scoring_bytes
from minigrpo.models.args import ModelArgs
from minigrpo.models.presets import preset_config
from minigrpo.reward_fns import RewardError

CONFIGS = Path(__file__).parents[1] / "configs"
QWEN15 = ModelArgs.from_hf_config(preset_config("qwen2.5-1.5b"))
SMOLLM2 = ModelArgs.from_hf_config(preset_config("smollm2-135m"))

SMALL_RM = dict(  # realistic proportions (F = 2.75 D, GQA 4:2), room for long rows
    vocab_size=len(WORDS),
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
QWEN7B_PARAMS = 7_615_616_512  # Qwen2.5-7B with its LM head (152064 x 3584), which a reward model has not


def _tiny_reward_model(directory, family: str = "llama") -> None:
    """A random transformers *ForSequenceClassification checkpoint with the word-level tokenizer."""
    from test_reward_model import hf_reward_model  # imports transformers' classes safely (or skips)

    hf_reward_model(directory, family, tokenizer=tiny_tokenizer(), **SMALL_RM)


def _with_reward_model(cfg, **kwargs):
    """cfg with a `reward_model` reward after its own rewards."""
    cfg.rewards = [*cfg.rewards, RewardSpec("reward_model", kwargs=kwargs)]
    return cfg


def _qwen7b_reward_model(directory) -> str:
    """A Qwen2.5-7B sequence-classification config.json (the pre-flight reads nothing else)."""
    config = {**preset_config("qwen2.5-7b"), "architectures": ["Qwen2ForSequenceClassification"], "num_labels": 1}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def _lora_cfg(*overrides: str):
    return load_config(CONFIGS / "qwen2.5-1.5b_gsm8k_lora.yaml", list(overrides))


# ------------------------------------------------------------------------------------------------
# CPU: the counts against a loaded reward model and a real scoring call


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied (the LM head left out) and tied embeddings
def test_weights_equal_the_loaded_reward_models_bytes(family, dtype, tmp_path):
    from minigrpo.models.reward_model import load_reward_model

    _tiny_reward_model(tmp_path / "rm", family)
    model, _ = load_reward_model(tmp_path / "rm", dtype=getattr(torch, dtype), load_tokenizer=False)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    b = torch.finfo(getattr(torch, dtype)).bits // 8
    assert reward_model_weight_bytes(model.args, 1, b) == held
    cfg = _with_reward_model(load_config(CONFIGS / "demo_cpu.yaml"), path=str(tmp_path / "rm"), device="cpu")
    cfg.rewards[-1].kwargs["dtype"] = dtype
    est = estimate_peak(cfg, SMOLLM2, prompt_tokens=64, device_type="cpu")
    assert est.parts["reward_models"] == held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_forward_within_2pct_of_a_measured_call(dtype, tmp_path):
    """Eight rows of 128 tokens scored 4 at a time: the tracker's peak over the whole call (ids, mask,
    positions, RoPE angles, block transients, states) against reward_scoring_bytes(4 rows, 128 tokens)."""
    from minigrpo.models.reward_model import make_reward_model

    _tiny_reward_model(tmp_path / "rm")
    name = str(dtype).removeprefix("torch.")
    fn = make_reward_model(str(tmp_path / "rm"), batch_size=4, device="cpu", dtype=name, chat_template="none")
    model, tok = fn.load()
    prompts = [f"repeat {d}" for d in range(8)]
    completions = [" ".join(str((d + i) % 10) for i in range(126)) for d in range(8)]
    lengths = {len(fn.render(tok, p, c)) for p, c in zip(prompts, completions)}
    assert lengths == {128}
    fn(prompts, completions, ["0"] * 8)  # warm up
    tracker = AllocationTracker()
    with tracker:
        scores = fn(prompts, completions, ["0"] * 8)
    assert len(scores) == 8 and all(s is not None for s in scores)
    est = reward_scoring_bytes(model.args, 4, 128, dtype.itemsize)
    assert abs(est - tracker.peak) / tracker.peak < 0.02, (est, tracker.peak)  # 0.07% and 0.13% seen


# ------------------------------------------------------------------------------------------------
# the GPU estimate: a 7B reward model from its config.json


def test_a_7b_reward_model_is_held_in_every_phase_and_scores_in_its_own(tmp_path, capsys):
    """Without the reward model the LoRA run peaks at its rollout or update; a bf16 7B reward model adds
    (P - V D + D) * 2 bytes to every phase, and its scoring forward (16 rows of 256 + 512 tokens) has
    the scoring phase: the static parts plus that forward, each phase the sum of the parts it names."""
    cfg = _lora_cfg("grpo.prompts_per_step=4", "grpo.group_size=8")
    base = estimate_peak(cfg, QWEN15, prompt_tokens=256)
    path = _qwen7b_reward_model(tmp_path / "rm7b")
    est = estimate_peak(_with_reward_model(cfg, path=path, batch_size=16), QWEN15, prompt_tokens=256)
    weights = (QWEN7B_PARAMS - 152064 * 3584 + 3584) * 2 + 64 * 4  # bf16 body + score head, fp32 RoPE freqs
    assert est.parts["reward_models"] == weights == 14_141_245_696
    for phase, value in base.phases.items():
        assert est.phases[phase] - value == (weights if value else 0), phase
    rm = ModelArgs.from_hf_config(preset_config("qwen2.5-7b"))
    assert est.parts["reward_scoring"] == reward_scoring_bytes(rm, 16, 256 + cfg.sampler.max_new_tokens, 2)
    static = base.phases["optimizer"] - base.parts["gradients"] - base.parts["optimizer_step_transient"]
    assert est.phases["scoring"] == static + weights + est.parts["reward_scoring"]
    assert list(est.phases)[:3] == ["rollout", "scoring", "logprobs"]
    for phase, value in est.phases.items():
        if value:
            assert sum(est.parts.get(name, 0) for name in est.members[phase]) == value, phase
    preflight(cfg, QWEN15, "cuda", 256, free_bytes=est.total * 2)
    table = capsys.readouterr().out
    assert f"  reward_models{weights / 2**30:24.2f}" in table and "    scoring" in table


def test_only_a_reward_model_on_the_runs_device_counts(tmp_path):
    """device cpu: nothing on the GPU; cuda:1 counts on device 1 only (every rank of a torchrun job
    loads its copy there); float32 doubles the bytes; max_length shortens the scored rows, and a forward
    takes batch_size rows at most, the step's rows if fewer."""
    path = _qwen7b_reward_model(tmp_path / "rm7b")
    rm = ModelArgs.from_hf_config(preset_config("qwen2.5-7b"))
    bf16 = reward_model_weight_bytes(rm, 1, 2)

    def parts(index=None, world_size=1, **kwargs):
        cfg = _with_reward_model(_lora_cfg("grpo.prompts_per_step=4", "grpo.group_size=4"), path=path, **kwargs)
        est = estimate_peak(cfg, QWEN15, prompt_tokens=256, device_index=index, world_size=world_size)
        return est.parts["reward_models"], est.parts["reward_scoring"], "scoring" in est.phases

    assert parts(device="cpu") == (0, 0, False)
    assert parts(device="cuda:1") == (0, 0, False) == parts(index=0, device="cuda:1")
    assert parts(index=1, device="cuda:1")[0] == bf16
    assert parts(index=1, world_size=2, device="cuda:1")[0] == 2 * bf16
    assert parts(index=0, world_size=2, device="cuda")[0] == bf16  # rank 0: its own GPU, the current one
    assert parts(index=1, device="auto")[0] == bf16  # a run on cuda:1 alone: "auto" loads on the run's GPU, 1
    assert parts(index=1, world_size=2, device="cuda")[0] == bf16  # rank 1: its own GPU
    T = 256 + _lora_cfg().sampler.max_new_tokens
    weights, scoring, _ = parts(dtype="float32")  # batch_size 8 of the step's 16 rows
    assert weights == reward_model_weight_bytes(rm, 1, 4) and scoring == reward_scoring_bytes(rm, 8, T, 4)
    assert parts(batch_size=32, max_length=128)[1] == reward_scoring_bytes(rm, 16, 128, 2)  # the step's 16 rows
    cpu = estimate_peak(
        _with_reward_model(_lora_cfg(), path=path, device="cpu"), QWEN15, prompt_tokens=256, device_type="cpu"
    )
    assert cpu.parts["reward_models"] == reward_model_weight_bytes(rm, 1, 4)  # auto dtype on the CPU: float32


def test_the_refusal_names_the_reward_model_and_its_settings(tmp_path):
    """A run that fits in 40 GiB alone does not with a float32 7B reward model scoring 64 rows at once:
    the refusal names reward_models among the largest parts, and the advice offers fewer rows per
    forward, bfloat16 weights, and (last) the CPU, as `--set rewards.<i>.kwargs.<key>=` lines."""
    cfg = _lora_cfg("grpo.prompts_per_step=8", "grpo.group_size=8", "model.gradient_checkpointing=true")
    alone = estimate_peak(cfg, QWEN15, prompt_tokens=256).total
    free = 40 * 2**30
    assert alone < free * 0.95
    index = len(cfg.rewards)
    cfg = _with_reward_model(cfg, path=_qwen7b_reward_model(tmp_path / "rm7b"), batch_size=64, dtype="float32")
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, QWEN15, "cuda", 256, free_bytes=free, verbose=False)
    message = str(err.value)
    assert "reward_models 26.3 GiB" in message
    fixes = memory.suggest_fixes(cfg, QWEN15, prompt_tokens=256, budget=int(free * 0.95))
    keys = [key for key, *_ in fixes]
    assert f"rewards.{index}.kwargs.dtype" in keys and keys[-1] == f"rewards.{index}.kwargs.device"
    dtype = next(fix for fix in fixes if fix[0] == f"rewards.{index}.kwargs.dtype")
    assert dtype[1:3] == ("float32", "bfloat16") and dtype[3] <= free * 0.95
    assert f"--set rewards.{index}.kwargs.dtype=bfloat16 (rewards.{index}.kwargs.dtype=float32 -> bfloat16" in message


def test_fewer_rows_per_scoring_forward_is_offered_when_the_scoring_peaks(tmp_path):
    """A bf16 7B reward model scoring 128 rows of 2304 tokens at once: the scoring phase is the peak,
    and the largest batch_size (halved from 128) that fits is named, with the same reward model."""
    lengths = ("grpo.prompts_per_step=16", "grpo.group_size=8", "sampler.max_new_tokens=2048")
    cfg = _lora_cfg(*lengths, "model.gradient_checkpointing=true")
    cfg = _with_reward_model(cfg, path=_qwen7b_reward_model(tmp_path / "rm7b"), batch_size=128)
    est = estimate_peak(cfg, QWEN15, prompt_tokens=256)
    assert est.peak_phase == "scoring"
    budget = est.phases["scoring"] - est.parts["reward_scoring"] // 2 - 1  # 64 rows miss it by a byte
    fixes = memory.suggest_fixes(cfg, QWEN15, prompt_tokens=256, budget=budget)
    found = [fix for fix in fixes if fix[0].endswith("kwargs.batch_size")]
    assert [fix[1:3] for fix in found] == [(128, 32)] and found[0][3] <= budget


def test_a_hub_id_is_noted_and_bad_kwargs_are_named(tmp_path):
    cfg = _with_reward_model(_lora_cfg(), path="some-org/some-reward-model")
    est = estimate_peak(cfg, QWEN15, prompt_tokens=256)
    assert est.parts["reward_models"] == 0 and any("some-org/some-reward-model" in n for n in est.notes)
    path = _qwen7b_reward_model(tmp_path / "rm7b")
    index = len(_lora_cfg().rewards)
    for key, value in (("batch_size", 0), ("dtype", "fp8"), ("path", None)):
        bad = _with_reward_model(_lora_cfg(), **{"path": path, key: value})
        with pytest.raises(RewardError, match=rf"rewards\.{index}\.kwargs\.{key}="):
            estimate_peak(bad, QWEN15, prompt_tokens=256)


def test_a_colocated_vllm_sampler_is_awake_while_the_reward_model_scores(tmp_path):
    """The rewards are scored before vLLM sleeps (train.py: rollout_phase, then sampler.sleep()), so the
    scoring phase holds vLLM's share as the rollout does, and the reward model's forward on top: with a
    bf16 7B reward model it is the step's peak."""
    cfg = _lora_cfg("sampler.kind=vllm", "sampler.vllm_sleep=true")
    cfg = _with_reward_model(cfg, path=_qwen7b_reward_model(tmp_path / "rm7b"))
    est = estimate_peak(cfg, QWEN15, prompt_tokens=256, device_total=80 * 2**30)
    share = int(cfg.sampler.gpu_memory_utilization * 80 * 2**30)
    assert est.parts["vllm"] == share and "vllm" in est.members["scoring"]
    assert est.phases["scoring"] - est.phases["rollout"] == est.parts["reward_scoring"] > 0
    assert est.peak_phase == "scoring"
    assert est.phases["scoring"] - est.phases["optimizer"] == share + est.parts["reward_scoring"] - sum(
        est.parts[k] for k in ("gradients", "optimizer_step_transient")
    )


def test_only_a_set_with_a_reward_model_setting_fits_and_the_refusal_names_it(tmp_path):
    """Full activations (27.6 GiB without a reward model) and a float32 7B reward model (26.3 GiB) on
    21 GiB: no single change fits (checkpointing leaves the reward model's 26.3 GiB, bfloat16 weights or
    the CPU leave the activations), so the set named together must change the reward model too
    (rewards.<i>.kwargs.*, which with_setting changes in a copy): it fits, by the same estimate."""
    from minigrpo.memory_knobs import with_setting

    cfg = _lora_cfg("grpo.prompts_per_step=8", "grpo.group_size=8")
    index = len(cfg.rewards)
    cfg = _with_reward_model(cfg, path=_qwen7b_reward_model(tmp_path / "rm7b"), dtype="float32")
    budget = 21 * 2**30
    found = memory.suggest_fixes(cfg, QWEN15, prompt_tokens=256, budget=budget)
    assert list(found) == [] and found.together is not None
    kept, total = found.together
    assert kept["model.gradient_checkpointing"] is True and kept[f"rewards.{index}.kwargs.dtype"] == "bfloat16"
    changed = cfg
    for key, value in kept.items():
        changed = with_setting(changed, key, value)
    assert estimate_peak(changed, QWEN15, prompt_tokens=256).total == total <= budget
    assert changed.rewards[index].kwargs["dtype"] == "bfloat16" and cfg.rewards[index].kwargs["dtype"] == "float32"
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, QWEN15, "cuda", 256, free_bytes=int(budget / 0.95) + 1, verbose=False)
    assert "No single setting fits; together these would (" in str(err.value)
    assert f" rewards.{index}.kwargs.dtype=bfloat16" in str(err.value)
    from minigrpo.memory_knobs import setting

    assert setting(cfg, f"rewards.{index}.kwargs.batch_size") == 8  # left out: the factory's default
