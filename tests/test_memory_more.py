"""Memory pre-flight (memory.py): the settings its error names must fit by the same estimate and load.

Each suggestion is applied the way a user would (`--set key=value` on the same config) and checked:
the config loads (config.validate) and its estimate is the total the suggestion states, under budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minigrpo import memory
from minigrpo.config import load_config
from minigrpo.memory import MemoryPreflightError, estimate_peak, preflight, suggest_fixes
from minigrpo.models.args import ModelArgs
from minigrpo.models.presets import preset_config

CONFIGS = Path(__file__).parents[1] / "configs"
QWEN15 = ModelArgs.from_hf_config(preset_config("qwen2.5-1.5b"))


def _applied(path: Path, overrides: list[str], fixes) -> dict[str, int]:
    """Each suggested change loaded as `--set key=value` on top of the same config: {key: its estimate}
    (load_config raises ConfigError for one the config's rules refuse)."""
    out = {}
    for key, _, new, _ in fixes:
        cfg = load_config(path, [*overrides, f"{key}={memory._show(new)}"])
        out[key] = estimate_peak(cfg, QWEN15, prompt_tokens=256).total
    return out


def test_ppo_suggestions_keep_the_rows_divisible_by_the_mini_batches():
    """algorithm: ppo with ppo.mini_batches=8 over B=4 x G=4 rows: a group size or prompt count of 3
    fits by the estimate but makes 12 rows, which 8 mini-batches do not divide (the config refuses it).
    The suggestions once named grpo.group_size=3 and grpo.prompts_per_step=3 (and stopped there); now
    each names the largest value that fits and loads, 2."""
    path = CONFIGS / "qwen2.5-1.5b_gsm8k.yaml"
    overrides = [
        *("algorithm=ppo", "ppo.value_model=lora", "ppo.mini_batches=8", "grpo.beta=0", "lora.enabled=true"),
        *("grpo.prompts_per_step=4", "grpo.group_size=4", "train.micro_batch_size=2"),
        *("sampler.max_new_tokens=4096", "model.gradient_checkpointing=true"),
    ]
    cfg = load_config(path, overrides)
    est = estimate_peak(cfg, QWEN15, prompt_tokens=256)
    budget = int(est.total * 0.97)
    fixes = suggest_fixes(cfg, QWEN15, prompt_tokens=256, budget=budget)
    chosen = {key: new for key, _, new, _ in fixes}
    assert chosen["grpo.group_size"] == 2 and chosen["grpo.prompts_per_step"] == 2, fixes
    totals = _applied(path, overrides, fixes)
    for key, _, _, total in fixes:
        assert totals[key] == total <= budget, key


def test_episode_rollouts_point_at_env_max_episode_tokens():
    """env.kind: a row is a whole episode (env.max_episode_tokens), so the update's rows and the turn cache
    shrink with it, while sampler.max_new_tokens (one turn) barely moves the peak. The error names the
    longest env.max_episode_tokens that fits (never below one turn); it once named no episode setting."""
    path = CONFIGS / "qwen2.5-1.5b_gsm8k_tools.yaml"
    overrides = ["model.gradient_checkpointing=true", "train.micro_batch_size=1", "lora.enabled=true"]
    cfg = load_config(path, overrides)
    est = estimate_peak(cfg, QWEN15, prompt_tokens=256)
    assert est.peak_phase == "rollout"
    free = int(est.total * 0.9 / 0.95)  # 90% of the peak usable after the 5% margin
    with pytest.raises(MemoryPreflightError) as err:
        preflight(cfg, QWEN15, "cuda", 256, free_bytes=free, verbose=False)
    assert "--set env.max_episode_tokens=" in str(err.value)
    budget = int(free * 0.95)
    fixes = suggest_fixes(cfg, QWEN15, prompt_tokens=256, budget=budget)
    (episode,) = [new for key, _, new, _ in fixes if key == "env.max_episode_tokens"]
    assert cfg.sampler.max_new_tokens <= episode < cfg.env.max_episode_tokens
    longer = estimate_peak(memory._with(cfg, "env.max_episode_tokens", episode + 32), QWEN15, prompt_tokens=256)
    assert longer.total > budget  # within the bisection's step of the longest that fits
    assert "sampler.max_new_tokens" not in {key for key, *_ in fixes}
    totals = _applied(path, overrides, fixes)
    for key, _, _, total in fixes:
        assert totals[key] == total <= budget, key
