"""More config mistakes: overrides into a file's misshapen values, YAML 1.1 dates, YAML hints, unread settings."""

from __future__ import annotations

import textwrap
import warnings

import pytest

from minigrpo.config import ConfigError, ConfigWarning, load_config, save_config


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_warnings(*args) -> list[str]:
    """The ConfigWarnings that load_config(*args) gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(*args)
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


# ----------------------------------------------------------------------------- overrides into the file's values


@pytest.mark.parametrize(
    ("yaml_text", "override", "message"),
    [
        # a section given as a list: was a TypeError traceback (a list indexed by the key's name)
        ("grpo: [4, 8]\n", "grpo.group_size=4", "grpo: expected mapping (GRPOCfg), got [4, 8]"),
        (
            "data:\n  synthetic: [1]\n",
            "data.synthetic.seed=1",
            "data.synthetic: expected mapping (SyntheticCfg), got [1]",
        ),
        ("data:\n  chat_template_kwargs: [1]\n", "data.chat_template_kwargs.x=1", "data.chat_template_kwargs: "),
        ("rewards:\n  - [correctness]\n", "rewards.0.weight=2", "rewards.0: expected mapping (RewardSpec), got"),
        ("rewards:\n  - name: correctness\n    kwargs: [1]\n", "rewards.0.kwargs.a=1", "rewards.0.kwargs: expected"),
        # a mapping where a list is: the error showed the override's item inside the file's value
        (
            "rewards: {name: correctness}\n",
            "rewards.0.weight=2",
            "rewards: expected list[mapping (RewardSpec)], got {'name': 'correctness'}",
        ),
    ],
)
def test_an_override_into_a_misshapen_value_of_the_file_is_one_error(tmp_path, yaml_text, override, message):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)  # the file that holds the value is named


def test_an_item_of_a_pair_can_be_overridden(tmp_path):
    """`train.betas.1=0.95` sets beta2 and keeps beta1 (the default's, or the file's)."""
    assert load_config(None, ["train.betas.1=0.95"]).train.betas == (0.9, 0.95)
    path = write(tmp_path, "train:\n  betas: [0.8, 0.9]\n")
    assert load_config(path, ["train.betas.0=0.85"]).train.betas == (0.85, 0.9)
    with pytest.raises(ConfigError, match=r"^train.betas.2: no such item \(the list train.betas has 2\)$"):
        load_config(None, ["train.betas.2=0.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.x=1", "algorithm.x: algorithm is one of 'grpo', 'online_dpo', 'ppo', it has no sub-keys"),
        ("rewards.0.kwargs.a.b=1", "rewards.0.kwargs.a.b: rewards.0.kwargs.a is a free-form value, it has no sub-keys"),
        ("train.max_grad_norm.x=1", "train.max_grad_norm.x: train.max_grad_norm is a float, it has no sub-keys"),
    ],
)
def test_a_sub_key_of_a_single_value_is_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


# ----------------------------------------------------------------------------- YAML


def test_dates_and_a_lone_equals_sign_are_text_as_in_yaml_1_2(tmp_path):
    """YAML 1.1 (PyYAML) reads `2024-01-01` as a date: a run named by its date was refused, a reward
    got a datetime.date and a chat template refused its variable; 1.2 reads them as text, as `--set` does."""
    path = write(
        tmp_path,
        """\
        run:
          name: 2024-01-01
        data:
          chat_template_kwargs: {date_string: 2024-01-01}
        sampler:
          stop: [=, 2001-12-14t21:59:43.10-05:00]
        rewards:
          - name: correctness
            kwargs: {since: 2024-01-01}
        """,
    )
    cfg = load_config(path)
    assert cfg.run.name == "2024-01-01"
    assert cfg.data.chat_template_kwargs == {"date_string": "2024-01-01"}
    assert cfg.sampler.stop == ["=", "2001-12-14t21:59:43.10-05:00"]
    assert cfg.rewards[0].kwargs == {"since": "2024-01-01"}
    save_config(cfg, tmp_path / "saved.yaml")  # written quoted: yaml.safe_load reads the text back too
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert "'2024-01-01'" in (tmp_path / "saved.yaml").read_text()


@pytest.mark.parametrize(
    ("yaml_text", "where", "hint"),
    [
        ("grpo:\n\tgroup_size: 4\n", "(line 2, column 1)", "; indent with spaces, not tabs"),
        (
            "data:\n  synthetic:\n    operations: [+, *]\n",
            "(line 3, column 22)",
            '; a value that begins with * or & must be quoted ("*")',
        ),
        (
            "data:\n  synthetic:\n    operations: [*x]\n",
            "(line 3, column 18)",
            '; a value that begins with * or & must be quoted ("*")',
        ),
        ("run:\n  name: @home\n", "(line 2, column 9)", "; quote a value that begins with it"),
    ],
)
def test_a_yaml_mistake_says_how_to_fix_it(tmp_path, yaml_text, where, hint):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: not valid YAML: ") and str(e.value).endswith(f"{where}{hint}"), str(
        e.value
    )


def test_an_override_that_is_no_yaml_says_how_to_fix_it():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.synthetic.operations=[+, *]"])
    assert str(e.value).startswith("data.synthetic.operations: cannot parse the value '[+, *]': not valid YAML")
    assert str(e.value).endswith('must be quoted ("*")')


# ----------------------------------------------------------------------------- settings the run never reads


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (
            ["sampler.gpu_memory_utilization=0.9", "sampler.vllm_sleep=false"],
            "sampler.gpu_memory_utilization=0.9, sampler.vllm_sleep=False: ignored, read only with sampler.kind=vllm",
        ),
        (
            ["grpo.max_resample_rounds=5"],
            "grpo.max_resample_rounds=5: ignored, read only with grpo.dynamic_sampling=true",
        ),
        (
            ["algorithm=ppo", "grpo.max_resample_rounds=5"],
            "grpo.max_resample_rounds=5: ignored, read only with grpo.dynamic_sampling=true, which algorithm=ppo "
            "does not take",
        ),
        (
            ["grpo.is_cap=5", "grpo.is_min=0.5"],
            "grpo.is_cap=5.0, grpo.is_min=0.5: ignored, read only with grpo.is_correction set",
        ),
        (["train.min_lr_ratio=0.1"], "train.min_lr_ratio=0.1: ignored, read only by the linear and cosine schedules"),
        (["log.wandb_project=x"], "log.wandb_project='x': ignored, read only with log.wandb=true"),
        (["checkpoint.save_merged=true"], "checkpoint.save_merged=True: ignored, read only with lora.enabled=true"),
        (
            ["data.source=gsm8k", "data.synthetic.max_operand=99"],
            "data.synthetic.max_operand=99: ignored, read only with data.source=synthetic",
        ),
    ],
)
def test_a_setting_the_run_never_reads_warns(overrides, warned):
    """Each was ignored without a word (a user tuning grpo.is_cap with the own sampler changes nothing)."""
    assert config_warnings(None, overrides) == [warned]


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampler.kind=vllm", "sampler.gpu_memory_utilization=0.9", "sampler.vllm_sleep=false"],
        ["grpo.dynamic_sampling=true", "grpo.max_resample_rounds=5"],
        ["grpo.is_correction=token_mask", "grpo.is_cap=5", "grpo.is_min=0.5"],
        ["sampler.kind=vllm", "grpo.is_cap=5"],  # vLLM turns is_correction on
        ["train.schedule=cosine", "train.min_lr_ratio=0.1"],
        ["log.wandb=true", "log.wandb_project=x"],
        ["lora.enabled=true", "checkpoint.save_merged=true"],
        ["data.source=gsm8k", "sft.source=synthetic", "data.synthetic.max_operand=99"],  # SFT's task in one file
        ["data.synthetic.max_operand=99"],
    ],
)
def test_a_setting_the_run_reads_does_not_warn(overrides):
    assert config_warnings(None, overrides) == []
