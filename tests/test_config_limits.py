"""Config limits against what the run can use: one error per mistake (not its echo through a derived
field or a rule between fields), integers a run could mean (no 1e300, no count past int32), the
divisors of a step's size listed without walking every number below it, and float16 on the CPU."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from minigrpo import build
from minigrpo.config import Config, ConfigError, load_config
from minigrpo.errors import one_line


def config_error(*overrides: str) -> str:
    """The one line that load_config(None, overrides) raises."""
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return one_line(str(info.value))


# ----------------------------------------------------------------------------- one error per mistake


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # epsilon_high derives from epsilon: not reported again (nor the rule between them)
        (["grpo.epsilon=-0.1"], "grpo.epsilon must be > 0, got -0.1"),
        (["grpo.epsilon=.nan"], "grpo.epsilon must be > 0, got nan"),
        # eval.max_new_tokens and env.max_episode_tokens derive from sampler.max_new_tokens
        (["sampler.max_new_tokens=0"], "sampler.max_new_tokens must be >= 1, got 0"),
        (["data.num_eval=-1"], "data.num_eval must be >= 0, got -1"),  # eval.num_prompts derives from it
        # a rule between fields on a value its own limit refused adds nothing
        (["eval.samples_per_prompt=0"], "eval.samples_per_prompt must be >= 1, got 0"),
        (["eval.samples_per_prompt=4", "eval.temperature=-1"], "eval.temperature must be >= 0, got -1.0 (0 = greedy)"),
        (["train.steps=0", "train.warmup_steps=5"], "train.steps must be >= 1, got 0"),
        (["grpo.epsilon_high=-1"], "grpo.epsilon_high must be > 0, got -1.0"),  # set by the user: reported
    ],
)
def test_a_mistake_is_reported_once(overrides, message):
    assert config_error(*overrides) == f"invalid config: {message}"


def test_a_derived_value_the_user_set_is_still_checked():
    """eval.max_new_tokens=0 set beside a good sampler.max_new_tokens is the user's own mistake."""
    assert config_error("eval.max_new_tokens=0") == "invalid config: eval.max_new_tokens must be >= 1, got 0"
    assert config_error("grpo.epsilon=0.3", "grpo.epsilon_high=0.2") == (
        "invalid config: grpo.epsilon_high (0.2) must be >= grpo.epsilon (0.3) or null"
    )


# ----------------------------------------------------------------------------- integers a run could mean


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.steps=1e300"],
            "train.steps: expected int, got '1e300' (a float beyond 2**53 is no exact integer; write the digits)",
        ),
        (
            ["run.seed=1e16"],
            "run.seed: expected int, got '1e16' (a float beyond 2**53 is no exact integer; write the digits)",
        ),
        (
            ["train.steps=1000000000000000000000000"],
            "invalid config: train.steps must be <= 2147483647, got 1000000000000000000000000 "
            "(no run can use a larger count)",
        ),
        (
            ["sampler.max_new_tokens=4294967296"],
            "invalid config: sampler.max_new_tokens must be <= 2147483647, got 4294967296 "
            "(no run can use a larger count)",
        ),
        (
            ["grpo.prompts_per_step=65536", "grpo.group_size=65536", "train.micro_batch_size=1"],
            "invalid config: grpo.prompts_per_step * grpo.group_size (65536 * 65536 = 4294967296 sequences per step) "
            "must be <= 2147483647: no step can sample or train on more",
        ),
    ],
)
def test_integers_no_run_can_use_are_refused(overrides, message):
    assert config_error(*overrides) == message


def test_exact_floats_and_counts_within_the_limits_pass():
    cfg = load_config(None, ["run.seed=1e15", "train.steps=2147483647", "train.steps=2e3"])
    assert cfg.run.seed == 10**15 and cfg.train.steps == 2000


def test_the_divisors_of_a_large_step_are_listed_at_once():
    """10**7 sequences per step and micro_batch_size=3: the divisors closest to 3 (the listing of every
    number below 10**7 took seconds; at 10**9 sequences it hangs)."""
    start = time.perf_counter()
    message = config_error("grpo.prompts_per_step=10000", "grpo.group_size=1000", "train.micro_batch_size=3")
    assert time.perf_counter() - start < 1.0
    assert message.endswith("divisors of 10000000 near 3: [1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50]"), message


# ----------------------------------------------------------------------------- float16 on the CPU


def dtype_warnings(cfg: Config, device: torch.device) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build.check_dtype(cfg, device)
    return [str(w.message) for w in caught]


def test_float16_on_the_cpu_warns_and_names_the_faster_dtypes():
    """float16 runs on the CPU (the loss scale included) but each operation converts: a warning. bfloat16,
    float32 and auto run as asked on the CPU, and float16 on CUDA is taken without a word."""
    cfg = load_config(None, ["run.dtype=float16", "run.device=cpu"])
    assert dtype_warnings(cfg, torch.device("cpu")) == [
        "run.dtype=float16 on the CPU (run.device=cpu) is several times slower than float32: CPUs convert each "
        "float16 operation; use run.dtype=float32 (auto on the CPU) or bfloat16"
    ]
    assert dtype_warnings(cfg, torch.device("cuda")) == []
    for dtype in ("bfloat16", "float32", "auto"):
        assert dtype_warnings(load_config(None, [f"run.dtype={dtype}"]), torch.device("cpu")) == []
    with warnings.catch_warnings(record=True) as caught:  # train and SFT check it before loading (check_packages)
        warnings.simplefilter("always")
        build.check_packages(cfg)
    assert any("run.dtype=float16 on the CPU" in str(w.message) for w in caught)
