"""Config files written for other tools, and YAML that loses keys: each is one `error:` line naming the key and file.

TRL / PEFT / transformers names (`num_generations`) name our key that means the same (config_names.py); a section
given a scalar that an override steps into names the file; two keys of one mapping that are the same text are
refused instead of one silently winning."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from test_config_fuzz import cli_error, write  # beside this file

from minigrpo import configio
from minigrpo.config import Config, ConfigError, load_config
from minigrpo.config_names import IN_SECTION, NAMES, foreign_name

# the names a config copied from TRL's GRPOConfig, PEFT's LoraConfig or transformers' TrainingArguments holds most
EXPECTED = ["num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            "max_completion_length", "max_prompt_length", "beta", "epsilon", "epsilon_high", "loss_type",
            "num_iterations", "temperature", "lora_r", "r", "lora_alpha", "lora_dropout", "target_modules",
            "use_vllm", "vllm_gpu_memory_utilization", "bf16", "gradient_checkpointing", "max_steps",
            "warmup_ratio", "lr_scheduler_type", "logging_steps", "save_steps", "output_dir", "seed",
            "scale_rewards", "reward_weights", "mask_truncated_completions", "top_p", "top_k", "min_p",
            "repetition_penalty"]  # fmt: skip
SECTIONS = {f.name for f in dataclasses.fields(Config)}


def resolves(key: str) -> bool:
    """Whether a dotted key is a real key of Config: each part a field of its section, or an index of a list
    (`rewards.N.weight`: N stands for any entry)."""
    tp: typing.Any = Config
    for part in key.replace(".N.", ".0.").split("."):
        if typing.get_origin(tp) is list and part.isdigit():
            tp = typing.get_args(tp)[0]
            continue
        if not (dataclasses.is_dataclass(tp) and part in typing.get_type_hints(tp)):
            return False
        tp = typing.get_type_hints(tp)[part]
    return True


def test_resolves_refuses_what_is_no_key():
    assert resolves("grpo.group_size") and resolves("rewards.N.weight") and resolves("data.synthetic.seed")
    assert not resolves("grpo.num_generations") and not resolves("train.lr.x") and not resolves("rewards.weight")


def test_every_key_the_tables_name_is_a_real_config_key():
    """Each target, and each dotted key a note names, exists; no table name is a key where it is looked up."""
    entries = [(("", name), found) for name, found in NAMES.items()] + list(IN_SECTION.items())
    assert len(entries) > 60
    for (section, name), (target, note) in entries:
        assert target is None or resolves(target), (name, target)
        assert target is not None or note, name  # no equivalent: the note says what to do instead
        for key in re.findall(r"\b[a-z_]+(?:\.[a-zN_0-9]+)+", note):
            if key.split(".")[0] in SECTIONS:
                assert resolves(key), (name, key, note)
        assert not resolves(f"{section}.{name}".lstrip(".")), (section, name)
    for section, _ in IN_SECTION:
        assert section in SECTIONS
    assert [name for name in EXPECTED if name not in NAMES] == []


def test_every_name_of_the_table_is_one_line_naming_our_key_in_any_section(capsys):
    """Each name, at the top level, in a section and in a list entry, as an override: one line naming the
    unknown key and our key (or that there is none), never a bare did-you-mean."""
    for name, (target, _) in NAMES.items():
        for where in (w for w in (name, f"grpo.{name}", f"log.{name}", f"rewards.0.{name}") if not resolves(w)):
            message = cli_error(capsys, ["--set", f"{where}=1"])
            section = where.rpartition(".")[0]
            said = IN_SECTION.get((section, name), NAMES[name])[0] if section else target
            assert message.startswith(f"unknown config key '{where}': "), message
            assert (f"this is {said} here" if said else "no equivalent here: ") in message, message
            assert "did you mean" not in message


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("num_generations: 4\n", "'num_generations': this is grpo.group_size here (completions sampled per prompt)"),
        (
            "train: {beta: 0.04}\n",
            "'train.beta': this is grpo.beta here (the KL coefficient; online DPO's beta is dpo.beta, PPO's KL weight "
            "ppo.kl_coef)",
        ),
        (
            "grpo:\n  per_device_train_batch_size: 8\n",
            "'grpo.per_device_train_batch_size': this is train.micro_batch_size here (the nearest: completions "
            "per forward/backward pass on each process, as TRL's counts completions, not prompts; but a step here "
            "trains on all grpo.prompts_per_step * grpo.group_size completions)",
        ),
        (
            "sft: {per_device_train_batch_size: 8}\n",
            "'sft.per_device_train_batch_size': this is sft.micro_batch_size here (conversations per "
            "forward/backward pass; sft.batch_size counts a step's)",
        ),
        (
            "train: {warmup_ratio: 0.1}\n",
            "'train.warmup_ratio': no equivalent here: train.warmup_steps counts steps: write ratio * train.steps",
        ),
        (
            "lora: {target_modules: [q_proj, v_proj]}\n",
            "'lora.target_modules': this is lora.targets here (not the same: short names q, k, v, o, gate, up, down, "
            "not q_proj ...)",
        ),
        ("dpo: {loss_type: ipo}\n", "'dpo.loss_type': this is dpo.loss here (sigmoid or ipo)"),
        ("eval: {max_completion_length: 64}\n", "'eval.max_completion_length': this is eval.max_new_tokens here"),
    ],
)
def test_a_file_with_a_foreign_name_names_the_file_and_our_key(capsys, tmp_path, text, said):
    path = write(tmp_path, text)
    assert cli_error(capsys, ["--config", str(path)]) == f"{path}: unknown config key {said}"


def test_the_key_a_foreign_name_points_to_takes_its_value():
    """Following the advice loads: num_generations -> grpo.group_size, top_k -> sampler.top_k, max_steps."""
    for name, value in (("num_generations", 4), ("top_k", 5), ("learning_rate", 3e-6), ("max_steps", 7)):
        target = NAMES[name][0]
        assert target is not None and foreign_name("", name) == f"this is {target} here" + (
            f" ({NAMES[name][1]})" if NAMES[name][1] else ""
        )
        cfg = load_config(None, [f"{target}={value}"])
        section, key = target.split(".")
        assert getattr(getattr(cfg, section), key) == value


def test_other_unknown_keys_keep_their_did_you_mean():
    assert foreign_name("", "group_size") is None and foreign_name("grpo", "group_sise") is None
    with pytest.raises(ConfigError, match=r"^unknown config key 'train\.delta' \(did you mean 'grpo\.delta'\?\)"):
        load_config(None, ["train.delta=2"])


# ----------------------------------------------------------------------------- a scalar where a section belongs


@pytest.mark.parametrize(
    ("text", "override", "said"),
    [
        ("grpo: 3\n", "grpo.beta=0.1", "grpo: expected mapping (GRPOCfg), got 3"),
        (
            "data: {synthetic: [1]}\n",
            "data.synthetic.seed=1",
            "data.synthetic: expected mapping (SyntheticCfg), got [1]",
        ),
        ("rewards: [3]\n", "rewards.0.weight=2", "rewards.0: expected mapping (RewardSpec), got 3"),
        ("rewards: 3\n", "rewards.0.weight=2", "rewards: expected list[mapping (RewardSpec)], got 3"),
    ],
)
def test_a_scalar_section_that_an_override_steps_into_names_the_file(capsys, tmp_path, text, override, said):
    """`grpo: 3` in the file with --set grpo.beta=0.1 was "grpo: expected mapping ..." with no file named."""
    path = write(tmp_path, text)
    assert cli_error(capsys, ["--config", str(path), "--set", override]) == f"{path}: {said}"


def test_a_scalar_section_an_override_wrote_names_no_file(capsys, tmp_path):
    path = write(tmp_path, "train: {steps: 2}\n")
    message = cli_error(capsys, ["--config", str(path), "--set", "grpo=3", "grpo.beta=0.1"])
    assert message == "grpo: expected mapping (GRPOCfg), got 3"


# ----------------------------------------------------------------------------- keys that are the same text


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            'rewards: [{name: correctness, kwargs: {1: a, "1": b}}]\n',
            "duplicate key '1' at line 1 (first at line 1): 1 and '1' are the same key once read as text; keep one",
        ),
        (
            "data:\n  chat_template_kwargs:\n    '1.5': a\n    1.5: b\n",
            "duplicate key '1.5' at line 4 (first at line 3): '1.5' and 1.5 are the same key once read as text; "
            "keep one",
        ),
        (
            '1: a\n"1": b\n',
            "duplicate key '1' at line 2 (first at line 1): 1 and '1' are the same key once read as text; keep one",
        ),
        ("train: {steps: 2}\ntrue: 1\n'true': 2\n", "duplicate key 'true' at line 3 (first at line 2)"),
        (
            "base: &b {7: x}\nrewards: [{name: correctness, kwargs: {<<: *b, '7': y}}]\n",
            "duplicate key '7' in the mapping at line 2 (one merged in by <<): 7 and '7' are the same key once read "
            "as text; keep one",
        ),
    ],
)
def test_two_keys_of_the_same_text_are_one_line_naming_the_file_and_key(capsys, tmp_path, text, said):
    """`{1: a, "1": b}` loaded as {'1': 'b'}: the keys differ in Python, and the str keys of the config kept one."""
    path = write(tmp_path, text)
    assert cli_error(capsys, ["--config", str(path)]) == f"{path}: {said}"


def test_keys_of_the_same_text_in_an_override_are_refused_and_distinct_keys_load(capsys):
    message = cli_error(capsys, ["--set", 'rewards.0.kwargs={2: a, "2": b}'])
    assert message.startswith("rewards.0.kwargs: cannot parse the value") and "duplicate key '2' at line 1" in message
    assert configio.parse_yaml('{1: a, "2": b, 1.5: c, x: {"1": d}}') == {1: "a", "2": "b", 1.5: "c", "x": {"1": "d"}}
    assert configio.parse_yaml("a: &a {1: x}\nb: {<<: *a, 1: y}\n")["b"] == {1: "y"}  # a merge's key overridden
