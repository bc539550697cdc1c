"""Config files as users write them: YAML that loops or nests without end, a syntax error whose cause is
lines above where the parser stops, `~` in paths, and keys written dotted in the file."""

from __future__ import annotations

import textwrap

import pytest
from helpers.cli import one_error_line, run_module

from minigrpo.config import ConfigError, load_config


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- YAML that never ends


@pytest.mark.parametrize(
    ("yaml_text", "line"),
    [
        # an alias inside the value it names: free-form values were walked without end (RecursionError traceback)
        ("rewards:\n  - name: correctness\n    kwargs: &k {x: *k}\n", 3),
        ("data:\n  chat_template_kwargs: &c {enable_thinking: false, more: [*c]}\n", 2),
        ("train: &t {lr: *t}\n", 1),
    ],
)
def test_an_alias_inside_its_own_value_is_one_error(tmp_path, yaml_text, line):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, yaml_text))
    assert "is inside the value" in str(e.value) and f"(line {line}," in str(e.value), str(e.value)


def test_an_alias_loop_in_an_override_is_one_error():
    with pytest.raises(ConfigError, match=r"rewards\.0\.kwargs: .*the alias \*a is inside the value &a"):
        load_config(None, ["rewards.0.kwargs={x: &a [*a]}"])


def test_nesting_without_end_is_one_error(tmp_path):
    """5000 `[`: Python's stack overflowed in the YAML composer (RecursionError traceback)."""
    with pytest.raises(ConfigError, match=r"nested deeper than 100 levels \(line 1,"):
        load_config(write(tmp_path, "train: " + "[" * 5000 + "]" * 5000 + "\n"))


def test_aliases_that_do_not_loop_still_load(tmp_path):
    path = write(
        tmp_path,
        """\
        rewards:
          - name: correctness
            kwargs: &shared {tolerance: 1.0e-3, names: [a, b]}
          - name: int_answer
            kwargs: *shared
        """,
    )
    cfg = load_config(path)
    assert cfg.rewards[0].kwargs == cfg.rewards[1].kwargs == {"tolerance": 1e-3, "names": ["a", "b"]}


def test_a_loop_through_the_command_line_is_one_error_line(tmp_path):
    path = write(tmp_path, "rewards:\n  - name: correctness\n    kwargs: &k {x: [*k]}\n")
    message = one_error_line(run_module("minigrpo.train", "--config", str(path), cwd=tmp_path))
    assert message.startswith(f"{path}: not valid YAML: the alias *k is inside the value &k it names (line 3,")


# ----------------------------------------------------------------------------- where a syntax error began


@pytest.mark.parametrize(
    ("opening", "context"),
    [
        ("  betas: [0.9, 0.99\n", "while parsing a flow sequence that began at line 3, column 10"),
        ("  schedule: 'cosine\n", "while scanning a quoted scalar that began at line 3, column 13"),
    ],
)
def test_an_unclosed_bracket_or_quote_names_the_line_it_opens(tmp_path, opening, context):
    """The parser notices an unclosed `[` or quote only at the end of the file: the message named the
    last line alone (line 13 here), not the line to fix."""
    filler = "".join(f"  # note {i}\n" for i in range(8))
    path = write(tmp_path, "train:\n  lr: 1.0e-5\n" + opening + filler + "log:\n  every: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert context in str(e.value), str(e.value)


def test_a_one_line_syntax_error_is_not_repeated(tmp_path):
    """A construct that began on the line of the error adds nothing: the message stays as it was."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "run:\n  name: 'it's'\n"))
    assert str(e.value).endswith("not valid YAML: expected <block end>, but found '<scalar>' (line 2, column 13)")


# ----------------------------------------------------------------------------- `~` in paths


def test_home_in_the_output_folder_is_the_home_folder(tmp_path, monkeypatch):
    """`run.output_dir: ~/runs` wrote the run into a folder named `~` under the working directory,
    while data.path and model.name_or_path read `~` as the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["run.output_dir=~/runs", "run.name=r1"])
    assert cfg.run.run_dir == tmp_path / "runs" / "r1"
    assert cfg.run.output_dir == "~/runs"  # the saved config keeps what the user wrote


def test_home_in_the_config_path_is_the_home_folder(tmp_path, monkeypatch):
    """`--config=~/x.yaml` reaches the program unexpanded (the shell expands ~ only at a word's start)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "train:\n  lr: 3.0e-5\n", name="home.yaml")
    assert load_config("~/home.yaml").train.lr == 3e-5


# ----------------------------------------------------------------------------- keys written dotted in a file


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "train.lr: 1.0e-5\n",
            "unknown config key 'train.lr': a YAML key holds no dots (those are for --set); nest it: train: {lr: ...}",
        ),
        (
            "data:\n  synthetic.seed: 3\n",
            "unknown config key 'data.synthetic.seed': a YAML key holds no dots (those are for --set); "
            "nest it in data: synthetic: {seed: ...}",
        ),
    ],
)
def test_a_dotted_key_in_a_file_is_told_to_nest(tmp_path, yaml_text, message):
    """`train.lr: 1e-5` (the --set spelling) was "unknown config key 'train.lr' (did you mean 'train'?)":
    a suggestion of the key's own section, for a key the schema has."""
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"


def test_a_dotted_key_the_schema_lacks_still_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(did you mean 'train'\?\)"):
        load_config(write(tmp_path, "train.lrr: 1\n"))


def test_sft_ignores_the_limits_of_grpo_sections_but_not_its_own(tmp_path):
    """python -m minigrpo.sft reads run, model, lora, train, log, checkpoint and sft: a GRPO-only value out of
    its range (sampler.temperature 0, grpo.group_size 1) loads there, and fails as before under train;
    a bad value of a section SFT reads is still refused."""
    from minigrpo.config_rules import rules_of
    from minigrpo.sft import sft_config_from_args

    path = write(tmp_path, "sft: {source: synthetic}\nsampler: {temperature: 0}\ngrpo: {group_size: 1}\n")
    cfg = sft_config_from_args(["--config", str(path)])
    assert cfg.sampler.temperature == 0 and cfg.grpo.group_size == 1
    with pytest.raises(ConfigError, match=r"sampler\.temperature"):
        load_config(path)
    with rules_of("sft"), pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(path, ["train.lr=-1"])
