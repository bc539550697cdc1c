"""Config mistakes as a fuzzer makes them, through the real command line in-process: every one is a single
`error:` line (exit status 2, no traceback) naming the key, and, when a file wrote it, the file."""

from __future__ import annotations

import dataclasses
import threading
import warnings

import pytest

from minigrpo import configio
from minigrpo.config import Config, ConfigError, config_from_args, load_config
from minigrpo.config_limits import MAX_SECONDS
from minigrpo.errors import run_cli
from minigrpo.train import main as train_main


def cli_error(capsys, argv: list[str], main=None) -> str:
    """The one `error:` line of a command line that must fail before anything loads."""
    with pytest.raises(SystemExit) as e:
        run_cli(config_from_args, argv) if main is None else main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def leaf_keys(cls: type = Config, path: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            keys += leaf_keys(factory, f"{path}{f.name}.")
        else:
            keys.append(f"{path}{f.name}")
    return keys


# settings under which a section is read: its checks between fields run only there
READ_WITH = {
    "ppo.": ["algorithm=ppo", "grpo.group_size=1"],
    "dpo.": ["algorithm=online_dpo"],
    "env.": ["env.kind=gsm8k_tools"],
}
BAD_VALUES = ["0", "-1", ".nan", "-.inf", "1e400", "abc", "[1]", "{a: 1}"]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_every_key_given_a_wrong_value_is_one_line_naming_it(capsys, value):
    """Each leaf key of every section, with its section read: loads, or fails as one line naming the key.
    ppo.mini_batches=0 with algorithm ppo was a ZeroDivisionError traceback (its rule divided by it)."""
    for key in [*leaf_keys(), "rewards.0.weight", "rewards.0.timeout_s", "rewards.0.name"]:
        base = next((sets for prefix, sets in READ_WITH.items() if key.startswith(prefix)), [])
        try:
            with warnings.catch_warnings():  # settings this combination ignores: not what is tested here
                warnings.simplefilter("ignore")
                run_cli(config_from_args, ["--set", *base, f"{key}={value}"])
        except SystemExit:
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(lines) == 1 and "Traceback" not in err, (key, value, err)
            assert key.rsplit(".", 1)[-1] in lines[0], (key, value, lines[0])


def test_ppo_mini_batches_of_zero_is_its_limit_error(capsys):
    message = cli_error(capsys, ["--set", "algorithm=ppo", "grpo.group_size=1", "ppo.mini_batches=0"])
    assert message == "invalid config: ppo.mini_batches must be >= 1, got 0"


def test_a_nul_character_in_a_text_setting_is_refused_before_the_run_folder_is_made(capsys, tmp_path):
    """run.name "a\\0b" passed every check; making the run folder then raised ValueError (embedded null
    byte), a traceback."""
    path = write(tmp_path, f'run: {{name: "a\\0b", output_dir: {tmp_path}}}\ntrain: {{steps: 1}}\n')
    message = cli_error(capsys, ["--config", str(path)], train_main)
    assert message == f"{path}: run.name: 'a\\x00b' holds a NUL character (\\0), which no name, path or text may hold"
    assert list(tmp_path.iterdir()) == [path]  # nothing was made
    with pytest.raises(ConfigError, match=r"^sampler\.stop\.0: 'x\\x00' holds a NUL"):
        load_config(None, ['sampler.stop=["x\\0"]'])


TIMEOUTS = ["rewards.0.timeout_s", "env.tool_timeout_s", "env.sandbox.timeout_s", "distributed.timeout_s"]


@pytest.mark.parametrize("key", TIMEOUTS)
def test_a_timeout_longer_than_a_timer_can_wait_is_refused(capsys, key):
    """A reward's or tool's call waits with Thread.join(timeout_s): past threading.TIMEOUT_MAX (about 9.2e9 s
    on Linux) the wait raised OverflowError mid-run, after the weights had loaded."""
    waiting = threading.Thread(target=lambda: None)
    waiting.start()
    with pytest.raises(OverflowError):
        waiting._wait_for_tstate_lock(timeout=1e10)  # what Thread.join(1e10) does
    waiting.join()
    assert MAX_SECONDS == 1e9 <= threading.TIMEOUT_MAX
    message = cli_error(capsys, ["--set", f"{key}=1e10"])
    assert message == f"invalid config: {key} must be <= 1e+09, got 10000000000.0 (longer than a timer can wait)"
    assert load_config(None, [f"{key}=1e9"]) is not None  # about 31 years still loads


def test_a_value_a_file_wrote_out_of_its_limit_names_the_file(capsys, tmp_path):
    path = write(tmp_path, "train: {lr: -1}\n")
    assert cli_error(capsys, ["--config", str(path)]) == f"{path}: invalid config: train.lr must be >= 0, got -1.0"
    # the same mistake made by an override is the override's: no file named, as for a wrong type
    assert cli_error(capsys, ["--config", str(path), "--set", "train.lr=-2"]) == (
        "invalid config: train.lr must be >= 0, got -2.0"
    )
    assert cli_error(capsys, ["--config", str(path), "--set", "train={lr: -3}"]) == (
        "invalid config: train.lr must be >= 0, got -3.0"
    )
    # a file's problem beside an override's: the file is named
    mixed = cli_error(capsys, ["--config", str(path), "--set", "grpo.epsilon=-1"])
    assert mixed.startswith(f"{path}: invalid config: ") and "train.lr" in mixed and "grpo.epsilon" in mixed


def test_an_empty_config_name_says_so(capsys):
    """--config "" was "cannot read config file '': Is a directory" (Path("") is the working folder)."""
    assert cli_error(capsys, ["--config", ""]) == (
        "the config file name is empty (''): give a YAML file, or leave out --config"
    )


def test_a_config_under_an_unknown_users_home_is_one_line(capsys):
    """--config=~nouser/x.yaml (the shell leaves a `~` after `=`) was a RuntimeError traceback."""
    message = cli_error(capsys, ["--config=~no_such_user_here/x.yaml"])
    assert message.startswith("cannot read config file '~no_such_user_here/x.yaml': ")  # then Python's reason
    assert message.endswith(" (write the path out in full)")


def test_keys_that_yaml_11_reads_as_booleans_or_null_keep_their_name(capsys, tmp_path):
    """`on:` was the unknown key 'train.True', `~:` 'None'; reward kwargs `{no: 1}` passed True=1."""
    assert cli_error(capsys, ["--config", str(write(tmp_path, "train: {on: 1}\n"))]).startswith(
        f"{tmp_path / 'cfg.yaml'}: unknown config key 'train.on';"
    )
    assert "unknown config key '~';" in cli_error(capsys, ["--config", str(write(tmp_path, "~: 1\n"))])
    cfg = load_config(write(tmp_path, "rewards: [{name: correctness, kwargs: {no: yes, 'off': 2}}]\n"))
    assert cfg.rewards[0].kwargs == {"no": True, "off": 2}  # values stay YAML's booleans
    assert configio.parse_yaml("a: {true: ~}") == {"a": {"true": None}}


@pytest.mark.parametrize(
    ("key", "guess"),
    [
        ("model.path", "model.name_or_path"),  # was data.path: the same name in another section came first
        ("model.name", "model.name_or_path"),  # was run.name
        ("eval.num", "eval.num_prompts"),
        ("sampler.temp", "sampler.temperature"),
        ("train.delta", "grpo.delta"),  # a whole key of another section still wins over a close sibling (betas)
        ("eval.every", "log.every"),
        ("train.group_size", "grpo.group_size"),
    ],
)
def test_an_unknown_key_suggests_the_sibling_that_holds_its_words(capsys, key, guess):
    assert f"unknown config key '{key}' (did you mean '{guess}'?)" in cli_error(capsys, ["--set", f"{key}=1"])


def test_an_integer_too_long_to_read_is_a_short_line(capsys, tmp_path):
    """5001 digits: the error repeated them all (twice for an override) and called them 'no integer'."""
    digits = "1" + "0" * 5000
    message = cli_error(capsys, ["--set", f"train.steps={digits}"])
    assert len(message) < 300 and "(5001 characters)" in message and "too many digits" in message, message
    path = write(tmp_path, f"train: {{steps: {digits}}}\n")
    message = cli_error(capsys, ["--config", str(path)])
    assert len(message) < 300 and message.startswith(f"{path}: not valid YAML: '1000"), message


COUNTS = ["data.max_prompt_tokens", "data.num_eval", "sampler.max_rows", "grpo.max_resample_rounds", "log.every",
          "checkpoint.every", "checkpoint.keep_last", "eval.num_prompts", "sft.max_seq_len", "sft.batch_size",
          "sft.micro_batch_size"]  # fmt: skip


@pytest.mark.parametrize("key", COUNTS)
def test_a_count_no_run_can_use_is_one_line(capsys, key):
    """Counts past MAX_COUNT passed: sft.batch_size=10**20 (which its micro-batch of 8 divides) made the data
    loader build an endless list of row indices."""
    message = cli_error(capsys, ["--set", f"{key}={10**20}"])
    assert f"{key} must be <= {2**31 - 1}, got {10**20} (no run can use a larger count)" in message
