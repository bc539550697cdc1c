"""The typed config: defaults, YAML round trip, override coercion, strict keys, cross-field validation."""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys
import textwrap
import types
import typing
import warnings
from pathlib import Path

import pytest

from minigrpo import configio
from minigrpo.config import (
    Config,
    ConfigError,
    ConfigWarning,
    GRPOCfg,
    RewardSpec,
    SamplerCfg,
    TrainCfg,
    build_arg_parser,
    config_diff,
    config_from_args,
    config_to_dict,
    load_config,
    resolve_dtype,
    save_config,
    validate,
)
from minigrpo.errors import UsageError, UserError, one_line


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- defaults, round trip


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == Config()
    assert validate(cfg) == []
    assert cfg.model.name_or_path == "smollm2" and cfg.model.arch is None
    assert (cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.train.micro_batch_size) == (8, 8, 8)
    assert cfg.sequences_per_step == 64 and cfg.micro_batches_per_step == 8
    assert cfg.grpo.loss_type == "dapo" and cfg.train.lr == 1e-6 and cfg.train.betas == (0.9, 0.99)
    assert cfg.rewards == [RewardSpec(name="correctness")]
    assert cfg.lora.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    assert cfg.data.source == "synthetic" and cfg.data.synthetic.max_operand == 9
    assert str(cfg.run.run_dir) == "runs/run"


def test_derived_fields_fill_only_when_none():
    cfg = load_config(None, ["data.num_eval=50", "sampler.max_new_tokens=64"])
    assert cfg.eval.num_prompts == 50 and cfg.eval.max_new_tokens == 64
    cfg = load_config(None, ["eval.num_prompts=20", "eval.max_new_tokens=32", "sampler.max_new_tokens=64"])
    assert cfg.eval.num_prompts == 20 and cfg.eval.max_new_tokens == 32
    # the packaged model fills name_or_path only when neither it nor arch is given
    cfg = load_config(None, ["model.arch=qwen2.5-1.5b"])
    assert cfg.model.name_or_path is None and cfg.model.arch == "qwen2.5-1.5b"
    # no held-out rows: the derived eval.num_prompts follows to 0 instead of failing its own check
    assert load_config(None, ["data.num_eval=0"]).eval.num_prompts == 0


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "run.name=exp1",
            "lora={enabled: true, r: 8, quantize_base: nf4}",
            "grpo.epsilon_high=0.28",
            "grpo.is_correction=sequence_mask",
            "train.betas=[0.9, 0.95]",
            "train.lr=3e-6",
            'sampler.stop=["</answer>", "\\n\\nQ:"]',
            "rewards=[{name: correctness, weight: 2}, {name: 'my_pkg.rew:fmt', kwargs: {strict: true}}]",
            "data.synthetic.instruction=Answer: a colon, # a hash, and 'quotes'.",  # verbatim text
            'data.system_prompt="Think step by step.\\nThen answer."',  # quoted: YAML escapes apply
        ],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert Config.from_dict(config_to_dict(cfg)) == cfg
    assert cfg.train.betas == (0.9, 0.95) and isinstance(cfg.train.betas, tuple)
    assert cfg.data.synthetic.instruction == "Answer: a colon, # a hash, and 'quotes'."
    assert cfg.data.system_prompt == "Think step by step.\nThen answer."
    assert '  system_prompt: "Think step by step.\\nThen answer."\n' in path.read_text()
    assert "  betas: [0.9, 0.95]\n" in path.read_text()
    assert cfg.rewards[1] == RewardSpec(name="my_pkg.rew:fmt", weight=1.0, kwargs={"strict": True})
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically


def test_yaml_file_with_nested_reward_specs(tmp_path):
    path = write(
        tmp_path,
        """
        grpo: {group_size: 4, loss_type: grpo}
        train:
          lr: 1e-5          # PyYAML reads this as the string "1e-5"
          steps: 1e3        # also a string; integral, so a fine int
        rewards:
          - name: correctness
            weight: 1
          - name: length_penalty
            weight: 0.5
            timeout_s: 2
            kwargs: {max_length: 128, buffer: 32}
        """,
    )
    cfg = load_config(path)
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.rewards == [
        RewardSpec("correctness", 1.0),
        RewardSpec("length_penalty", 0.5, 2.0, {"max_length": 128, "buffer": 32}),
    ]
    assert isinstance(cfg.rewards[0].weight, float)


# ----------------------------------------------------------------------------- override coercion


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.lr=1e-5", "train.lr", 1e-5),  # YAML string -> float
        ("train.lr=3", "train.lr", 3.0),  # an int is a fine float
        ("train.steps=250", "train.steps", 250),
        ("grpo.group_size=4.0", "grpo.group_size", 4),  # an integral float is a fine int
        ("lora.enabled=true", "lora.enabled", True),
        ("log.plots=False", "log.plots", False),
        ('sampler.stop=["</answer>"]', "sampler.stop", ["</answer>"]),
        ("data.synthetic.operations=['*', '+']", "data.synthetic.operations", ["*", "+"]),
        ("data.synthetic.operations.1=*", "data.synthetic.operations", ["+", "*"]),
        ("data.system_prompt=null", "data.system_prompt", None),
        ("data.eval_split=~", "data.eval_split", None),
        ("train.max_grad_norm=null", "train.max_grad_norm", None),
        ("grpo.epsilon_high=0.28", "grpo.epsilon_high", 0.28),
        ("grpo.is_correction=token_truncate", "grpo.is_correction", "token_truncate"),
        ("train.betas=[0.8, 0.9]", "train.betas", (0.8, 0.9)),
        ("run.name=007", "run.name", "007"),  # a str field keeps the raw text, not the int 7
        ("model.revision=1e5", "model.revision", "1e5"),
        ("rewards.0.weight=2", "rewards", [RewardSpec("correctness", 2.0)]),
        ("rewards.0.kwargs.max_length=64", "rewards", [RewardSpec("correctness", kwargs={"max_length": 64})]),
    ],
)
def test_override_coerces_to_field_type(override, key, expected):
    cfg = load_config(None, [override])
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list) and expected and not isinstance(expected[0], RewardSpec):
        assert all(type(v) is type(e) for v, e in zip(value, expected))


def test_override_null_name_or_path_with_arch():
    cfg = load_config(None, ["model.name_or_path=null", "model.arch=qwen2.5-0.5b"])
    assert cfg.model.name_or_path is None and cfg.model.arch == "qwen2.5-0.5b"


def test_override_of_a_section_merges_into_yaml(tmp_path):
    path = write(tmp_path, "lora: {alpha: 64, dropout: 0.1}\n")
    cfg = load_config(path, ["lora={enabled: true, r: 4}"])
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (True, 4, 64.0, 0.1)


def test_literal_rejected_with_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["grpo.loss_type=dapoo"])
    assert str(e.value) == (
        "grpo.loss_type: expected one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', got 'dapoo' (did you mean 'dapo'?)"
    )
    with pytest.raises(ConfigError, match=r"run\.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16'"):
        load_config(None, ["run.dtype=fp16"])
    with pytest.raises(ConfigError, match=r"lora\.quantize_base: expected one of None, 'nf4', got 'nf8'"):
        load_config(None, ["lora.quantize_base=nf8"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=fast", "train.lr: expected float, got 'fast'"),
        ("grpo.group_size=2.5", "grpo.group_size: expected int, got 2.5"),
        ("grpo.group_size=true", "grpo.group_size: expected int, got True"),
        ("lora.enabled=maybe", "lora.enabled: expected bool, got 'maybe'"),
        ("sampler.stop=</answer>", "sampler.stop: expected list[str], got '</answer>' (a list of one: [</answer>])"),
        ("sampler.stop=[1]", "sampler.stop.0: expected str, got 1 (quote the value in YAML)"),
        # a single value hints at the list of one only where that list would load
        (
            "lora.targets=all-linear",
            "lora.targets: expected list[one of 'q', 'k', 'v', 'o', 'gate', 'up', 'down'], got 'all-linear'",
        ),
        (
            "lora.targets=[o_proj]",
            "lora.targets.0: expected one of 'q', 'k', 'v', 'o', 'gate', 'up', 'down', "
            "got 'o_proj' (did you mean 'o'?)",
        ),
        ("train.betas=[0.9]", "train.betas: expected list of 2 floats, got [0.9]"),
        ("grpo.epsilon_high=wide", "grpo.epsilon_high: expected float, got 'wide'"),
        ("rewards.0.kwargs=3", "rewards.0.kwargs: expected mapping, got 3"),
        ("rewards=[{weight: 2}]", "rewards.0.name: required (str)"),
        ("train=5", "train: expected mapping (TrainCfg), got 5"),
        # a LoRA target the model has no layer for: at load time, not from apply_lora after the weights load
        (
            "lora.targets=[q, qq]",
            "lora.targets.1: expected one of 'q', 'k', 'v', 'o', 'gate', 'up', 'down', got 'qq' (did you mean 'q'?)",
        ),
    ],
)
def test_wrong_type_names_key_type_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    """A value the file wrote names the file; one an override wrote (over the file) names no file."""
    path = write(tmp_path, "run: {name: 5}\ntrain: {lrr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: run.name: expected str, got 5 (quote the value in YAML)"
    with pytest.raises(ConfigError) as e:
        load_config(path, ["run.name=ok"])
    assert str(e.value).startswith(f"{path}: unknown config key 'train.lrr' (did you mean 'train.lr'?)")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train: {lr: 1.0}\n"), ["train.lr=fast"])
    assert str(e.value) == "train.lr: expected float, got 'fast'"
    with pytest.raises(ConfigError) as e:  # null is no text: no advice to quote it
        load_config(write(tmp_path, "data: {split: ~}\n"))
    assert str(e.value) == f"{tmp_path / 'cfg.yaml'}: data.split: expected str, got None"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: {steps: 010}\n", 10),  # YAML 1.1 (PyYAML): octal 8
        ("train: {steps: 0o10}\n", 8),
        ("train: {steps: 0x10}\n", 16),
        ("train: {steps: 1_000}\n", 1000),
        ("run: {seed: -007}\n", -7),
    ],
)
def test_yaml_integers_are_yaml_1_2(tmp_path, text, expected):
    cfg = load_config(write(tmp_path, text))
    assert expected in (cfg.train.steps, cfg.run.seed)


def test_sexagesimal_is_text_not_a_number(tmp_path):
    """YAML 1.1 reads `1:30` as 90: an int field refuses it, a string field keeps it."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train: {steps: 1:30}\n"))
    assert str(e.value) == f"{tmp_path / 'cfg.yaml'}: train.steps: expected int, got '1:30'"
    assert load_config(write(tmp_path, "run: {name: 1:30}\n")).run.name == "1:30"
    assert load_config(None, ["train.steps=010"]).train.steps == 10


def test_exponent_floats_are_numbers_in_kwargs_and_text_in_string_fields(tmp_path):
    """`1e-6` is a float to a reward function's kwargs (PyYAML 1.1 gives the text "1e-6"), even
    nested; a string field keeps the text, so `run.name: 1e-5` (and a run_config.yaml that
    yaml.safe_dump wrote unquoted) still loads."""
    text = "run: {name: 1e-5}\nrewards: [{name: correctness, kwargs: {tol: 1e-6, l: [1e3, {2e2: 5E1}], s: '1e-5'}}]\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.rewards[0].kwargs == {"tol": 1e-6, "l": [1000.0, {"2e2": 50.0}], "s": "1e-5"}
    assert type(cfg.run.name) is str and cfg.run.name == "1e-5"
    assert type(next(iter(cfg.rewards[0].kwargs["l"][1]))) is str
    save_config(cfg, tmp_path / "saved.yaml")
    assert "name: '1e-5'" in (tmp_path / "saved.yaml").read_text()  # quoted for 1.1 and 1.2 readers
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.LR=1", "unknown config key 'train.LR' (did you mean 'train.lr'?)"),
        ("TRAIN.lr=1", "unknown config key 'TRAIN' (did you mean 'train'?)"),
        ("grpo.loss_type=DAPO", "got 'DAPO' (did you mean 'dapo'?)"),
        ("lora.quantize_base=NF4", "got 'NF4' (did you mean 'nf4'?)"),
    ],
)
def test_suggestions_ignore_case(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("data.num_eval=20", "eval.num_prompts", 20),
        ("sampler.max_new_tokens=512", "eval.max_new_tokens", 512),
        ("env.max_turns=8", "env.max_episode_tokens", 8 * 256),
        ("grpo.epsilon=0.3", "grpo.epsilon_high", 0.3),
        ("sampler.kind=own", "grpo.is_correction", None),
        ("model.arch=qwen2.5-1.5b", "model.name_or_path", None),
    ],
)
def test_saved_derived_fields_follow_overrides_of_their_source(tmp_path, override, key, expected):
    """A saved config writes the derived values out; loading it with an override of a source
    re-derives them instead of keeping the saved value (eval of a checkpoint with --set)."""
    saved = tmp_path / "config.yaml"
    save_config(load_config(None, ["data.num_eval=50", "sampler.kind=vllm"]), saved)
    assert load_config(saved) == load_config(None, ["data.num_eval=50", "sampler.kind=vllm"])
    cfg = load_config(saved, ["sampler.kind=vllm", override] if "sampler.kind" not in override else [override])
    assert functools.reduce(getattr, key.split("."), cfg) == expected


def test_derived_values_set_by_the_user_stay(tmp_path):
    """A derived field the file sets to another value than its derivation is the user's: it stays."""
    path = write(tmp_path, "data: {num_eval: 50}\neval: {num_prompts: 30}\ngrpo: {epsilon_high: 0.28}\n")
    cfg = load_config(path, ["data.num_eval=40", "grpo.epsilon=0.25"])
    assert (cfg.eval.num_prompts, cfg.grpo.epsilon_high) == (30, 0.28)


def test_hand_built_config_is_type_checked_by_validate():
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float, got 'fast'$"):
        validate(Config(train=TrainCfg(lr="fast")))


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("yaml_text", "override", "message"),
    [
        ("trian: {lr: 1.0e-5}\n", None, "unknown config key 'trian' (did you mean 'train'?)"),
        ("grpo: {group_sise: 4}\n", None, "unknown config key 'grpo.group_sise' (did you mean 'grpo.group_size'?)"),
        (
            "data: {synthetic: {max_operant: 5}}\n",
            None,
            "'data.synthetic.max_operant' (did you mean 'data.synthetic.max_operand'?)",
        ),
        ("rewards: [{name: correctness, wieght: 2}]\n", None, "'rewards.0.wieght' (did you mean 'rewards.0.weight'?)"),
        (None, "train.lrr=1e-5", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (None, "train.group_size=4", "unknown config key 'train.group_size' (did you mean 'grpo.group_size'?)"),
        (None, "group_size=4", "unknown config key 'group_size' (did you mean 'grpo.group_size'?)"),
        (None, "sampler.xyzzy=1", "unknown config key 'sampler.xyzzy'; valid keys here: kind, temperature"),
    ],
)
def test_unknown_key_is_an_error_with_suggestion(tmp_path, yaml_text, override, message):
    path = write(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(ConfigError) as e:
        load_config(path, [override] if override else [])
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr", "override 'train.lr' must look like section.key=value"),
        ("rewards.3.weight=1", "rewards.3: no such item (the list rewards has 1)"),
        ("train.lr.x=1", "train.lr.x: train.lr is a float, it has no sub-keys"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_overrides_name_their_key_when_the_yaml_sets_it(tmp_path):
    """The same messages when the config file already holds the key (not only for the defaults)."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-5\nlora: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lr.x=1"])
    assert str(e.value) == "train.lr.x: train.lr is a float, it has no sub-keys"
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lr=[1,"])
    assert str(e.value).startswith("train.lr: cannot parse the value '[1,': not valid YAML")
    with pytest.raises(ConfigError) as e:  # a section given a scalar in the file: its type is named
        load_config(path, ["lora.r=2"])
    assert str(e.value).startswith(f"{path}: lora: expected")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections, got list"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "{}\n")) == Config()  # an explicit empty mapping: the defaults


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_config_file_is_an_error_naming_it(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"config file {path} is empty: it sets nothing (leave out --config to run the defaults)"


def test_duplicate_yaml_key_names_key_lines_and_file(tmp_path):
    path = write(
        tmp_path,
        """\
        run: {name: a}
        train:
          lr: 1.0e-5
          steps: 10
          lr: 3.0e-5
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: duplicate key 'lr' at line 5 (first at line 3)"
    with pytest.raises(ConfigError, match=r"duplicate key 'grpo' at line 3 \(first at line 1\)"):
        load_config(write(tmp_path, "grpo: {group_size: 4}\ntrain: {micro_batch_size: 4}\ngrpo: {beta: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"duplicate key 'r' at line 1"):  # also inside an override
        load_config(None, ["lora={r: 4, r: 8}"])
    # a key merged in with YAML's `<<` may be overridden by the mapping that merges it: no duplicate
    assert configio.parse_yaml("a: &x {r: 1, s: 2}\nb: {<<: *x, r: 3}\n") == {
        "a": {"r": 1, "s": 2},
        "b": {"r": 3, "s": 2},
    }


def test_bad_yaml_is_one_line_with_its_position(tmp_path):
    path = write(tmp_path, "train: {lr: 1.0e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not valid YAML: ") and "(line 2, column 1)" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- cross-field validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["grpo.prompts_per_step=3", "grpo.group_size=5", "train.micro_batch_size=4"],
            "grpo.prompts_per_step * grpo.group_size (3 * 5 = 15 sequences per step) must be divisible by "
            "train.micro_batch_size (4): each optimizer step trains on the N = B*G sequences in "
            "N / micro_batch_size equal passes; divisors of 15: [1, 3, 5, 15]",
        ),
        (["train.micro_batch_size=128"], "must be divisible by train.micro_batch_size (128)"),
        (["grpo.group_size=1"], "grpo.group_size must be >= 2, got 1 (advantages compare the completions"),
        (["grpo.epsilon=0"], "grpo.epsilon must be > 0, got 0.0"),
        (["grpo.epsilon_high=0.1"], "grpo.epsilon_high (0.1) must be >= grpo.epsilon (0.2) or null"),
        (["grpo.delta=0.9"], "grpo.delta must be > 1, got 0.9"),
        (["sampler.top_p=0"], "sampler.top_p must be in (0, 1], got 0.0"),
        (["sampler.top_p=1.5"], "sampler.top_p must be in (0, 1], got 1.5"),
        (["sampler.temperature=0"], "sampler.temperature must be > 0, got 0.0"),
        (["sampler.temperature=nan"], "sampler.temperature must be > 0, got nan"),
        (["sampler.max_new_tokens=0", "grpo.loss_type=dr_grpo"], "sampler.max_new_tokens must be >= 1, got 0"),
        (["sampler.max_rows=0"], "sampler.max_rows must be >= 1, got 0 (null = every row at once)"),
        (["sampler.kind=vllm", "sampler.max_rows=8"], "sampler.max_rows=8 applies to the own sampler"),
        (["data.eval_split=train"], "data.eval_split='train' is the training split (data.split)"),
        (["sampler.kind=vllm", "sampler.temperature=0.005"], "sampler.temperature must be 0 (greedy) or in [0.01, 2]"),
        (["sampler.kind=vllm", "sampler.temperature=2.5"], "with sampler.kind=vllm (vLLM raises a smaller one"),
        (["train.lr=-1e-6"], "train.lr must be >= 0, got -1e-06"),
        (["train.steps=10", "train.warmup_steps=20"], "train.warmup_steps (20) must be <= train.steps (10)"),
        (["train.betas=[0.9, 1.0]"], "train.betas must be in [0, 1), got [0.9, 1.0]"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1, got 0"),
        (["rewards=[]"], "rewards must list at least one reward function"),
        (["rewards.0.name=a b:f"], "rewards.0.name='a b:f' is neither a registry name nor 'package.module:function'"),
        (["rewards.0.weight=0"], "every rewards.*.weight is 0: every advantage would be 0"),
        (["data.source=jsonl"], "data.source='jsonl' needs data.path (a file, folder or repo id)"),
        (["data.source=hub"], "data.source='hub' needs data.path"),
        (["data.source=parquet", "data.path=r.jsonl"], "data.path='r.jsonl' does not match data.source='parquet'"),
        (["data.synthetic.min_operand=10"], "data.synthetic.min_operand (10) must be <= max_operand (9)"),
        (["run.device=gpu"], "run.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["run.name=a/b"], "run.name must be a plain folder name, got 'a/b'"),
        (["model.arch=x", "model.name_or_path=m"], "set exactly one of model.name_or_path ('m') and model.arch ('x')"),
        (["lora.quantize_base=nf4"], "lora.quantize_base='nf4' needs lora.enabled=true"),
        (["eval.num_prompts=500"], "eval.num_prompts (500) must be <= data.num_eval (200)"),
        (["env.kwargs={size: 5}"], "env.kwargs={'size': 5} are read only by a user class"),  # env.kind null: ignored
        (["env.format=hermes"], "env.format='hermes' is read only with env.kind set"),
        (["env.system_prompt=hi"], "env.system_prompt='hi' is read only with env.kind set"),
    ],
)  # fmt: skip
def test_cross_field_checks_name_the_settings(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert str(e.value).startswith("invalid config:\n  - ")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["grpo.group_size=1", "sampler.top_p=2", "checkpoint.keep_last=0"])
    assert str(e.value).count("\n  - ") == 3


@pytest.mark.parametrize(
    "overrides",
    [
        ["run.device=cuda:1", "run.dtype=bfloat16"],
        ["sampler.kind=vllm"],  # is_correction is filled (auto) when the config is built
        ["rewards.0.name=my_pkg.sub.rewards:score"],
        ["data.source=jsonl", "data.path=data/"],
        ["data.source=gsm8k"],  # no path: the hub repo openai/gsm8k
        ["grpo.prompts_per_step=3", "grpo.group_size=5", "train.micro_batch_size=5"],
        ["lora.enabled=true", "lora.quantize_base=nf4", "train.optimizer=paged_adamw8bit"],
        ["sampler.max_rows=3"],  # waves need not divide the rows
    ],
)
def test_valid_combinations_pass(overrides):
    cfg = load_config(None, overrides)
    assert cfg.grpo.is_correction == ("token_truncate" if cfg.sampler.kind == "vllm" else None)


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (["lora.r=8", "lora.alpha=16"], "lora.r=8, lora.alpha=16.0: ignored, the lora section is read only"),
        (["lora.targets=[q, v]"], "lora.targets=['q', 'v']: ignored"),
        (["lora.enabled=true", "lora.r=8"], None),  # read: no warning
        (["lora.enabled=false"], None),  # the defaults: nothing set
    ],
)
def test_lora_settings_without_lora_warn(overrides, warned):
    """Adapter settings with lora.enabled false are ignored: a warning naming them (not an error: a
    LoRA config run with --set lora.enabled=false keeps its other lora keys)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(None, overrides)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0], messages


def test_gspo_with_token_sum_loss_warns():
    with pytest.warns(ConfigWarning, match=r"importance_sampling_level='sequence' \(GSPO\) with grpo.loss_type='dapo'"):
        load_config(None, ["grpo.importance_sampling_level=sequence"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(None, ["grpo.importance_sampling_level=sequence", "grpo.loss_type=grpo"])
    assert validate(cfg) == []


def test_validation_runs_without_torch(tmp_path):
    """Config and data settings are checked before anything heavy is imported."""
    good = write(tmp_path, "grpo: {group_size: 4}\ntrain: {micro_batch_size: 4, lr: 1e-5}\n")
    code = textwrap.dedent(
        f"""
        import sys
        from minigrpo.config import ConfigError, load_config
        from minigrpo.data import build_dataset
        cfg = load_config({str(good)!r}, ["grpo.prompts_per_step=2"])
        assert cfg.train.lr == 1e-5 and len(build_dataset(cfg.data)) == 2000
        try:
            load_config(None, ["grpo.group_size=1"])
        except ConfigError:
            pass
        else:
            raise SystemExit("no error")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "triton"))
        raise SystemExit(f"imported {{heavy}}" if heavy else 0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- command line, helpers


def test_command_line(tmp_path):
    path = write(tmp_path, "run: {name: cli}\n")
    argv = ["--config", str(path), "--set", "grpo.group_size=4", "train.micro_batch_size=4", "--set", "train.lr=1e-5"]
    cfg = config_from_args([*argv, "--resume"])
    assert (cfg.run.name, cfg.grpo.group_size, cfg.train.micro_batch_size, cfg.train.lr) == ("cli", 4, 4, 1e-5)
    assert cfg.run.resume is True
    assert config_from_args(argv).run.resume is False


def test_resolve_dtype():
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"


def test_every_shipped_config_loads():
    """configs/*.yaml are valid as shipped (validated without touching any model)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert any(f.name == "demo_cpu.yaml" for f in files)
    for f in files:
        cfg = load_config(f)
        assert cfg.sequences_per_step % cfg.train.micro_batch_size == 0, f.name


def test_command_line_errors_are_usage_errors():
    with pytest.raises(UsageError) as e:
        config_from_args(["--bogus"])
    assert "unrecognized arguments: --bogus" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="expected at least one argument"):
        build_arg_parser().parse_args(["--set"])
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------- limits beside their fields


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=0", "lora.r must be >= 1, got 0"),
        ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1], got 1.5"),
        ("train.max_grad_norm=0", "train.max_grad_norm must be > 0, got 0.0"),
        ("data.synthetic.num_operands=1", "data.synthetic.num_operands must be >= 2, got 1"),
        ("eval.temperature=-1", "eval.temperature must be >= 0, got -1.0 (0 = greedy)"),
        ("checkpoint.every=-1", "checkpoint.every must be >= 0, got -1 (0 = only the final checkpoint)"),
        ("rewards.0.weight=nan", "rewards.0.weight must be finite, got nan"),
        ("rewards.0.timeout_s=0", "rewards.0.timeout_s must be > 0, got 0.0"),
        ("grpo.is_min=-0.1", "grpo.is_min must be >= 0, got -0.1"),
        (
            "sampler.temperature=.inf",
            "sampler.temperature must be > 0, got inf (use eval.temperature=0 for greedy evaluation)",
        ),
        ("train.lr=inf", "train.lr must be >= 0, got inf"),
        ("run.name=..", "run.name must be a plain folder name, got '..'"),
        ("run.device=cuda:x", "run.device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ],
)
def test_limits_beside_fields_name_key_limit_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"invalid config:\n  - {message}"
    assert one_line(str(e.value)) == f"invalid config: {message}"


def _numeric(tp) -> bool:
    """int/float, Optional of one, or a tuple of them (bool is no number here)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return len(args) == 1 and _numeric(args[0])
    if typing.get_origin(tp) is tuple:
        return all(_numeric(a) for a in args)
    return tp in (int, float)


def _unlimited_numeric_fields(cls, path="") -> list[str]:
    """Dotted keys of numeric fields declared without a limit (write spec(x, "any") to mean any)."""
    found = []
    for f in dataclasses.fields(cls):
        tp, key = typing.get_type_hints(cls)[f.name], f"{path}{f.name}"
        if dataclasses.is_dataclass(tp):
            found += _unlimited_numeric_fields(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            found += _unlimited_numeric_fields(typing.get_args(tp)[0], key + ".*.")
        elif _numeric(tp) and not f.metadata.get("limit"):
            found.append(key)
    return found


def test_every_numeric_field_declares_a_limit():
    assert _unlimited_numeric_fields(Config) == []

    @dataclasses.dataclass
    class Toy:  # the check itself can fail
        a: int = 1
        b: float | None = configio.spec(None, ">= 0")
        c: tuple[float, float] = (0.0, 1.0)
        d: bool = True
        e: str = "x"

    assert _unlimited_numeric_fields(Toy) == ["a", "c"]
    with pytest.raises(ValueError, match="bad limit '=> 1'"):
        configio.spec(1, "=> 1")


def test_limit_mini_language():
    within = configio.within
    assert within("> 0", 1e-9) and not within("> 0", 0.0) and within(">= 0", 0.0)
    assert within("in [0, 1)", 0.0) and not within("in [0, 1)", 1.0) and within("in (0, 1]", 1.0)
    assert not within("in (0, 1]", 0.0) and not within("< 1", 1.0) and within("<= 1", 1.0)
    assert not within(">= 0", math.nan) and not within("finite", math.inf) and within("any", math.nan)
    assert not within("> 0", math.inf) and not within("in [0, 1]", -math.inf) and within("any", math.inf)


def test_derived_fields_are_documented_and_filled():
    derived = {
        f"{section.name}.{f.name}": f.metadata["derived"]
        for section in dataclasses.fields(Config)
        if dataclasses.is_dataclass(typing.get_type_hints(Config)[section.name])
        for f in dataclasses.fields(typing.get_type_hints(Config)[section.name])
        if f.metadata.get("derived")
    }
    assert set(derived) == {
        "model.name_or_path",
        "grpo.epsilon_high",
        "grpo.is_correction",
        "eval.num_prompts",
        "eval.max_new_tokens",
        "env.max_episode_tokens",
    }
    for cfg in (Config(), load_config(None, ["sampler.kind=vllm"])):
        for key in derived:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            assert value is not None or (key == "grpo.is_correction" and cfg.sampler.kind == "own"), key


# ----------------------------------------------------------------------------- defaults decided once


def test_epsilon_high_is_filled_from_epsilon():
    assert GRPOCfg().epsilon_high == 0.2
    assert GRPOCfg(epsilon=0.1).epsilon_high == 0.1
    assert load_config(None, ["grpo.epsilon=0.3"]).grpo.epsilon_high == 0.3
    assert load_config(None, ["grpo.epsilon=0.3", "grpo.epsilon_high=0.4"]).grpo.epsilon_high == 0.4
    assert load_config(None, ["grpo.epsilon_high=null"]).grpo.epsilon_high == 0.2  # null: the default again


def test_is_correction_is_auto_for_vllm_only(tmp_path):
    assert Config(sampler=SamplerCfg(kind="vllm")).grpo.is_correction == "token_truncate"
    assert Config().grpo.is_correction is None  # own sampler: the trainer's kernels, nothing to correct
    cfg = load_config(None, ["sampler.kind=vllm"])
    assert cfg.grpo.is_correction == "token_truncate"
    save_config(cfg, tmp_path / "config.yaml")  # the saved config is the one that runs
    assert "  is_correction: token_truncate\n" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == cfg
    explicit = load_config(None, ["sampler.kind=vllm", "grpo.is_correction=sequence_mask"])
    assert explicit.grpo.is_correction == "sequence_mask"  # an explicit value wins
    assert load_config(None, ["grpo.is_correction=token_mask"]).grpo.is_correction == "token_mask"


def test_is_min_is_a_lower_bound_below_is_cap():
    assert Config().grpo.is_min is None
    assert load_config(None, ["grpo.is_min=0.5"]).grpo.is_min == 0.5
    assert load_config(None, ["grpo.is_min=3", "grpo.is_cap=3"]).grpo.is_min == 3.0
    with pytest.raises(ConfigError) as e:
        load_config(None, ["grpo.is_min=4"])
    assert str(e.value) == "invalid config:\n  - grpo.is_min (4.0) must be <= grpo.is_cap (3.0)"


def test_duplicate_reward_names_are_an_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rewards=[{name: correctness}, {name: xml_count}, {name: correctness, weight: 2}]"])
    assert str(e.value) == (
        "invalid config:\n  - rewards.2.name='correctness' repeats rewards.0.name: list each reward once "
        "(its metrics are keyed by its name)"
    )


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_duplicate_lora_targets_are_an_error(enabled):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"lora.enabled={enabled}", "lora.targets=[q, v, o, v]"])
    assert str(e.value) == "invalid config:\n  - lora.targets.3='v' repeats lora.targets.1: name each layer once"


def test_removed_fields_are_unknown_keys():
    for key, guess in (("train.logprob_chunk_size", None), ("eval.every", "log.every")):
        with pytest.raises(ConfigError, match=f"unknown config key '{key}'") as e:
            load_config(None, [f"{key}=5"])
        assert (f"did you mean '{guess}'" in str(e.value)) if guess else ("did you mean" not in str(e.value))


# ----------------------------------------------------------------------------- config_diff


def test_config_diff_lists_changed_dotted_keys():
    base = load_config(None)
    assert config_diff(base, base) == [] and config_diff(base, Config()) == []
    other = load_config(None, ["train.lr=3e-6", "rewards.0.weight=2", "train.betas=[0.9, 0.95]"])
    assert config_diff(base, other) == ["rewards.0.weight", "train.lr", "train.betas"]  # schema order
    assert config_diff(other, base) == ["rewards.0.weight", "train.lr", "train.betas"]
    # a derived value follows what it is derived from
    assert config_diff(base, load_config(None, ["sampler.max_new_tokens=64"])) == [
        "sampler.max_new_tokens",
        "eval.max_new_tokens",
        "env.max_episode_tokens",
    ]
    two = load_config(None, ["rewards=[{name: correctness}, {name: xml_count}]"])
    assert config_diff(base, two) == ["rewards"]  # another number of rewards: the list as a whole
    assert config_diff(base, load_config(None, ["rewards.0.kwargs={x: 1}"])) == ["rewards.0.kwargs.x"]


# ----------------------------------------------------------------------------- templates, huge numbers, None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # a field the task does not fill: a KeyError traceback when the questions were drawn
        (
            ["data.synthetic.question=What is {expression} in base {base}?"],
            "data.synthetic.question='What is {expression} in base {base}?': no field {base}; it may use "
            "{expression} (a literal brace is written {{ or }})",
        ),
        (["data.synthetic.question=Is {expression} a {set?"], "a {set?': expected '}' before end of string"),
        (["data.synthetic.question=What is {}?"], "data.synthetic.question='What is {}?': Replacement index 0"),
        # escaped braces are literal text: every question would read "{expression}", no expression
        (["data.synthetic.question=What is {{expression}}?"], "data.synthetic.question must contain {expression}"),
        # the same for the SFT reply drawn from the synthetic task: every reply "<answer>{answer}</answer>"
        (
            ["sft.source=synthetic", "sft.response_template=<answer>{{answer}}</answer>"],
            "sft.response_template must contain {answer}: '<answer>{{answer}}</answer>'",
        ),
        (
            ["sft.source=synthetic", "sft.response_template={expr} = {answer}"],
            "sft.response_template='{expr} = {answer}': no field {expr}; it may use {answer} and {expression}",
        ),
    ],
)
def test_format_templates_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith("invalid config:\n  - ")
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.synthetic.question=Compute {expression}, then say {{done}}."],
        ["data.synthetic.question={expression:>12} = ?"],
        ["sft.source=synthetic", "sft.response_template={expression} = {answer}"],
        ["sft.source=jsonl", "sft.path=x.jsonl", "sft.response_template=unused {{answer}}"],  # read by synthetic only
    ],
)
def test_valid_format_templates_load(overrides):
    load_config(None, overrides)


def test_a_question_template_error_is_a_config_error_before_any_data_is_drawn(tmp_path):
    from minigrpo.data import build_dataset

    cfg = Config()
    cfg.data.synthetic.question = "What is {expression} in base {base}?"
    with pytest.raises(ConfigError, match=r"no field \{base\}"):
        validate(cfg)
    with pytest.raises(KeyError):  # what a run met without the check: a traceback while drawing the questions
        build_dataset(cfg.data, "train")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # an int past the largest float: OverflowError tracebacks, in the coercion and in the limit check
        pytest.param(
            "train.lr=1" + "0" * 400,
            "train.lr: expected float, got 1" + "0" * 400 + " (too large for a float)",
            id="lr",
        ),
        pytest.param("rewards.0.weight=-1" + "0" * 309, "rewards.0.weight: expected float, got -1" + "0" * 309, id="w"),
        pytest.param(
            "train.warmup_steps=-1" + "0" * 400, "train.warmup_steps must be >= 0, got -1" + "0" * 400, id="int"
        ),
    ],
)
def test_integers_too_large_for_a_float_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_integers_beyond_float_range_pass_an_int_limit():
    big = 10**400
    assert configio.within(">= 1", big) and not configio.within("< 0", big)
    assert load_config(None, [f"log.sample_every={big}"]).log.sample_every == big
    assert load_config(None, ["train.lr=1" + "0" * 300]).train.lr == 1e300  # within a float's range: a float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  max_grad_norm: None\n",
            "train.max_grad_norm: expected float, got 'None' (write null, not None, for no value)",
        ),
        (
            "lora:\n  quantize_base: none\n",
            "lora.quantize_base: expected one of None, 'nf4', got 'none' (write null, not None, for no value)",
        ),
        (
            "grpo:\n  is_correction: None\n",
            "grpo.is_correction: expected one of None, 'token_truncate', 'token_mask', 'sequence_truncate', "
            "'sequence_mask', got 'None' (write null, not None, for no value)",
        ),
        ("train:\n  steps: None\n", "train.steps: expected int, got 'None'"),  # takes no null: no advice
    ],
)
def test_none_written_for_null_says_how_to_write_null(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"


def test_the_text_none_in_a_nullable_text_field_warns(tmp_path):
    """`system_prompt: None` is the text "None" in YAML: every prompt would get the system message "None"."""
    path = write(tmp_path, "data:\n  system_prompt: None\n  eval_split: none\nsampler:\n  stop: [None]\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path)
    assert (cfg.data.system_prompt, cfg.data.eval_split) == ("None", "none")  # the text, as YAML reads it
    assert [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)] == [
        "data.eval_split='none' is the text none, not null: write null (or ~) for no value",
        "data.system_prompt='None' is the text None, not null: write null (or ~) for no value",
    ]  # sampler.stop takes no null: "None" is a stop string like any other
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(write(tmp_path, "data:\n  system_prompt: null\n  eval_split: ~\n"))


def test_a_section_with_every_key_commented_out_takes_its_defaults(tmp_path):
    """`train:` with nothing under it (YAML reads null) is the section's defaults, as leaving it out is;
    a section that is not a mapping stays an error."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  # steps: 10\nsampler:\n")
    cfg = load_config(path)
    assert cfg.train == Config().train and cfg.sampler == Config().sampler
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train: expected mapping \(TrainCfg\), got 5$"):
        load_config(path)


@pytest.mark.parametrize("section", ["data", "env"])
def test_bad_template_variables_are_config_errors_when_the_config_loads(section):
    """A name no template can read (`enable-thinking`) or one the renderer sets itself is one line naming the
    key before anything loads, for the prompts' and the tool episodes' variables alike."""
    env = {"kind": "tools", "tools": ["calculator"]} if section == "env" else {}
    for bad, named in [({"enable-thinking": False}, "enable-thinking"), ({"messages": []}, "messages")]:
        raw = (
            {section: {**env, "chat_template_kwargs": bad}}
            if section == "env"
            else {"data": {"chat_template_kwargs": bad}}
        )
        with pytest.raises(ConfigError, match=rf"{section}.chat_template_kwargs.*{named}"):
            validate(Config.from_dict(raw))
    good = {"enable_thinking": False}
    raw = {section: {**env, "chat_template_kwargs": good}}
    cfg = Config.from_dict(raw)
    validate(cfg)
    assert getattr(cfg, section).chat_template_kwargs == good


@pytest.mark.parametrize("key", ["sampler.temperature", "eval.temperature"])
def test_a_temperature_too_small_or_too_large_for_fp32_is_a_config_error(key):
    """logits / T overflows fp32 below sampling's MIN_TEMPERATURE, 1 / T is no normal fp32 above its
    MAX_TEMPERATURE (the sampling kernel multiplies by it): refused when the config loads, not by the
    sampler once the weights are in."""
    from minigrpo.config_rules import MAX_TEMPERATURE, MIN_TEMPERATURE
    from minigrpo.sampling.params import MAX_TEMPERATURE as SAMPLING_MAX
    from minigrpo.sampling.params import MIN_TEMPERATURE as SAMPLING_MIN

    assert (MIN_TEMPERATURE, MAX_TEMPERATURE) == (SAMPLING_MIN, SAMPLING_MAX)
    for bad in ("1e-35", "1e38"):
        with pytest.raises(ConfigError, match=rf"{key} must be 0 \(greedy\) or in \[1e-30, 1e\+37\]"):
            load_config(None, [f"{key}={bad}"])
    for good in ("1e-30", "1e37"):
        assert load_config(None, [f"{key}={good}"]) is not None


def test_min_p_with_top_p_under_vllm_is_a_config_error():
    """vLLM applies min-p before top-p (the own sampler and the trainer after): refused when the config
    loads, not once the engine is built."""
    with pytest.raises(ConfigError, match=r"sampler.min_p=0.1 with sampler.top_p=0.9 cannot be sampled by vLLM"):
        load_config(None, ["sampler.kind=vllm", "sampler.min_p=0.1", "sampler.top_p=0.9"])
    assert load_config(None, ["sampler.min_p=0.1", "sampler.top_p=0.9"]) is not None  # the own sampler
    assert load_config(None, ["sampler.kind=vllm", "sampler.min_p=0.1"]) is not None


# GRPO-only settings that GRPO's rules refuse and SFT never reads, each with the key its error names
GRPO_ONLY = [
    ("train.micro_batch_size=3", "train.micro_batch_size"),  # 8 * 8 sequences per step; SFT reads sft.micro_batch_size
    ("rewards=[]", "rewards must list"),
    ("data.source=jsonl", "data.path"),
    ("sampler.stop=['']", "sampler.stop"),
    ("grpo.epsilon_high=0.1", "grpo.epsilon_high"),
    ("grpo.group_size=1", "grpo.group_size"),
    ("eval.samples_per_prompt=4", "eval.samples_per_prompt"),
    ("data.eval_split=train", "data.eval_split"),
    ("env.tools=[calculator]", "env.tools"),
]


@pytest.mark.parametrize(("override", "named"), GRPO_ONLY, ids=[o.split("=")[0] for o, _ in GRPO_ONLY])
def test_an_sft_config_is_refused_only_for_what_sft_reads(tmp_path, override, named):
    """python -m minigrpo.sft reads run, model, lora, train (not micro_batch_size), log, checkpoint, sft
    (and data.synthetic with sft.source=synthetic): a GRPO-only setting GRPO refuses does not stop it."""
    import re

    from minigrpo.sft import sft_config_from_args

    path = tmp_path / "sft.yaml"
    path.write_text("sft:\n  path: sft.jsonl\ngrpo:\n  prompts_per_step: 8\n  group_size: 8\n")
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(path, [override])
    cfg = sft_config_from_args(["--config", str(path), "--set", override])
    assert cfg.sft.path == "sft.jsonl"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.warmup_steps=5", "train.steps=2"], "train.warmup_steps (5) must be <= train.steps (2)"),
        (["model.activation_offload=true"], "model.activation_offload=true needs model.gradient_checkpointing"),
        (["sft.batch_size=6", "sft.micro_batch_size=4"], "sft.micro_batch_size (4) must divide sft.batch_size (6)"),
        (["sft.source=synthetic", "data.synthetic.operations=[]"], "data.synthetic.operations must list"),
    ],
    ids=["warmup", "offload", "sft_micro_batch", "synthetic"],
)
def test_an_sft_config_is_still_refused_for_what_sft_reads(tmp_path, overrides, named):
    import re

    from minigrpo.sft import sft_config_from_args

    path = tmp_path / "sft.yaml"
    path.write_text("sft:\n  path: sft.jsonl\n")
    with pytest.raises(ConfigError, match=re.escape(named)):
        sft_config_from_args(["--config", str(path), "--set", *overrides])
