"""What the logged metrics mean: every name a run of each algorithm writes to metrics.jsonl is documented in
README.md's Metrics section, a run writes the same names at every step, reward metrics describe the step's
first round (before dynamic sampling filters groups), and the numbers keep their units.

The runs are the loop tests' tiny copy task (tests/helpers/runs.py) and the multi-turn tool task of
tests/test_env_loop.py, two or three steps each on the CPU."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers.runs import launch, run_config

from minigrpo.datafiles import DataError
from minigrpo.grad_scale import GradScale, grad_scale_metrics
from minigrpo.loop_columns import EPISODE_COLUMNS, refuse_loop_columns
from minigrpo.step import peak_memory_gb

ROOT = Path(__file__).resolve().parents[1]
# names whose presence may change from step to step (README says which): all others are logged at every step
CONDITIONAL = re.compile(r"env/reward_turns_\d+|sync/probe_diff_(max|mean)")


def documented_names() -> list[re.Pattern]:
    """The metric names of README.md's Metrics table as patterns (`<name>`, `<k>`: any one path part)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    names = [name for row in rows for name in re.findall(r"`([^`]+)`", row)]
    assert len(names) > 80, names
    return [re.compile(re.sub(r"<[a-z]+>", "[^/]+", re.escape(n))) for n in names]


def undocumented(records: list[dict]) -> list[str]:
    patterns = documented_names()
    keys = {k for r in records for k in r if k != "step"}
    return sorted(k for k in keys if not any(p.fullmatch(k) for p in patterns))


def changing_names(records: list[dict]) -> list[str]:
    """Names logged at some steps only (besides the documented exceptions)."""
    steady = [{k for k in r if not CONDITIONAL.fullmatch(k)} for r in records]
    return sorted(set.union(*steady) - set.intersection(*steady))


def keys_line(records: list[dict]) -> str:
    return json.dumps(sorted({k for r in records for k in r}))


# ================================================================================================
# one short run of each algorithm: every name documented, the same names at every step

GRPO_EVERYTHING = {  # dynamic sampling, IS correction (so mismatch/*), KL, two iterations, a float16 loss scale
    "run": {"dtype": "float16"},
    "grpo": {
        "prompts_per_step": 4,
        "group_size": 4,
        "dynamic_sampling": True,
        "max_resample_rounds": 2,
        "num_iterations": 2,
        "beta": 0.1,
        "is_correction": "token_truncate",
    },
    "train": {"steps": 3, "micro_batch_size": 16},
}
RUNS = {
    "grpo": GRPO_EVERYTHING,
    "ppo": {
        "algorithm": "ppo",
        "grpo": {"prompts_per_step": 8, "group_size": 1},
        "train": {"steps": 2, "micro_batch_size": 8},
    },
    "online_dpo": {
        "algorithm": "online_dpo",
        "grpo": {"prompts_per_step": 4, "group_size": 4},
        "train": {"steps": 2, "micro_batch_size": 16},
    },
}


@pytest.mark.parametrize("name", list(RUNS))
def test_every_metric_a_run_logs_is_documented_and_logged_every_step(tmp_path, name):
    sections = {**RUNS[name], "run": {**RUNS[name].get("run", {}), "name": name}}
    records = launch(tmp_path, run_config(tmp_path, **sections))
    assert len(records) == sections["train"]["steps"]
    assert undocumented(records) == [], keys_line(records)
    assert changing_names(records) == [], keys_line(records)  # skipped_updates before the fix


def test_every_metric_of_a_tool_episode_run_is_documented(tmp_path):
    """env/* metrics (tools, several turns), with GRPO's."""
    from helpers.tiny import tiny_model
    from test_env_loop import WORDS, chat_tokenizer, env_config

    from minigrpo.models.loading import save_pretrained

    save_pretrained(tiny_model(seed=0, vocab_size=len(WORDS)), chat_tokenizer(), tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": "what is the secret ?", "answer": str(i % 10)}) + "\n")
    records = launch(tmp_path, env_config(tmp_path, "tools", log={"sample_every": 0}))
    assert any(k.startswith("env/") for k in records[0]), keys_line(records)
    assert undocumented(records) == [], keys_line(records)
    assert changing_names(records) == [], keys_line(records)


def test_the_documented_exceptions_are_documented():
    """The names the tests above let vary between steps are in the table too (with their condition)."""
    patterns = documented_names()
    for name in ("env/reward_turns_3", "sync/probe_diff_max", "sync/probe_diff_mean", "kept/reward", "loss_scale"):
        assert any(p.fullmatch(name) for p in patterns), name


# ================================================================================================
# reward metrics describe the first round; kept/* the groups trained on


def test_reward_metrics_describe_the_first_round_under_dynamic_sampling(tmp_path):
    """With one reward of weight 1, `reward` is reward/<name> (both the first round's mean): before the fix
    `reward` was the mean of the kept groups only (0.25 at step 1 against reward/exact_answer 0.0) and
    frac_zero_spread was always 0 there (the kept groups have a spread by construction)."""
    cfg = run_config(
        tmp_path,
        grpo={"prompts_per_step": 4, "group_size": 4, "dynamic_sampling": True, "max_resample_rounds": 2},
        train={"steps": 3, "micro_batch_size": 16},
    )
    records = launch(tmp_path, cfg)
    for r in records:
        assert abs(r["reward"] - r["reward/exact_answer"]) < 1e-6, r
        assert 0.0 <= r["kept/groups"] <= 4.0 and r["sampling_rounds"] >= 1.0
        if r["sampling_rounds"] < 3:  # rounds left over: every kept group has a spread
            assert r["kept/frac_zero_spread"] == 0.0, r
    assert any(r["frac_zero_spread"] > 0.0 for r in records), keys_line(records)
    assert records[0]["reward"] == 0.0 and records[0]["frac_zero_spread"] == 1.0, records[0]
    assert records[0]["kept/reward"] == 0.25 and records[0]["kept/frac_zero_spread"] == 0.0, records[0]


def test_without_dynamic_sampling_no_kept_metrics(tmp_path):
    cfg = run_config(tmp_path, grpo={"prompts_per_step": 4, "group_size": 4}, train={"steps": 1, "micro_batch_size": 8})
    (r,) = launch(tmp_path, cfg)
    assert not any(k.startswith("kept/") for k in r) and r["sampling_rounds"] == 1.0
    assert abs(r["reward"] - r["reward/exact_answer"]) < 1e-6


# ================================================================================================
# skipped updates, peak memory units


def test_skipped_updates_is_logged_from_the_first_step():
    """0 until an update is skipped, so metrics.jsonl has the same keys at every step."""
    assert grad_scale_metrics(GradScale()) == {"skipped_updates": 0.0}
    scale = GradScale.for_dtype(torch.float16)
    assert grad_scale_metrics(scale) == {"skipped_updates": 0.0, "loss_scale": 2.0**16}
    scale.record(float("nan"))
    assert grad_scale_metrics(scale) == {"skipped_updates": 1.0, "loss_scale": 2.0**15}


@pytest.mark.parametrize(("platform", "maxrss", "gib"), [("linux", 3 * 1024**2, 3.0), ("darwin", 3 * 1024**3, 3.0)])
def test_peak_memory_on_the_cpu_is_in_gib_on_linux_and_macos(monkeypatch, platform, maxrss, gib):
    """getrusage's ru_maxrss is KiB on Linux but bytes on macOS (1024x too large there before the fix)."""
    import resource

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert peak_memory_gb(torch.device("cpu")) == gib


# ================================================================================================
# data columns the loop would overwrite


@pytest.mark.parametrize("column", ["completion_lengths", "max_completion_length", "prompt_messages"])
def test_a_data_column_named_like_a_loop_column_is_one_error_line(tmp_path, capsys, column):
    """Before the fix the loop overwrote the data's column before any reward function saw it, silently."""
    from minigrpo.train import main

    cfg = run_config(tmp_path, grpo={"prompts_per_step": 2, "group_size": 2}, train={"steps": 1, "micro_batch_size": 4})
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "clash.jsonl"
    data.write_text("".join(json.dumps({**row, column: 1}) + "\n" for row in rows))
    cfg["data"]["path"] = str(data)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "c.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {data}: field {column!r} has the name of a column the training loop"), err


def test_episode_columns_are_refused_only_with_an_environment():
    from minigrpo.data import Example

    rows = [Example("q", "1", {"num_turns": 3}), Example("q", "2", {"messages": []})]
    refuse_loop_columns(rows, "data.jsonl", episodes=False)  # single-turn rows: no such loop column
    with pytest.raises(DataError, match=r"^data.jsonl: field 'num_turns' has the name of a column the multi-turn"):
        refuse_loop_columns(rows, "data.jsonl", episodes=True)
    assert set(EPISODE_COLUMNS) >= {"messages", "final_response", "num_turns", "tool_calls", "tool_results"}
    refuse_loop_columns([Example("q", "1", {"prompt_messages": 1})], "d", episodes=True)  # not added to episodes


def test_a_loop_column_in_the_data_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    """The check runs with the others before loading (build.check_before_loading), not at the first step."""
    from minigrpo import build
    from minigrpo.config import Config

    cfg = run_config(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**r, "prompt_messages": "x"}) + "\n" for r in rows))
    monkeypatch.setattr(build, "check_model_source", lambda *a, **k: pytest.fail("the model was read"))
    with pytest.raises(DataError, match=r"train.jsonl: field 'prompt_messages' has the name of a column"):
        build.check_before_loading(Config.from_dict(cfg))
