"""What a user reads of PPO and online DPO runs (curves.png panels), the progress bar with non-finite
throughput, and W&B without an API key or network (offline, or off with one warning)."""

from __future__ import annotations

import io
import json
import math
import sys
import types
from pathlib import Path

import pytest

from minigrpo.metrics import MetricsLogger, MissingBackendWarning
from minigrpo.metrics_table import si

NAN, INF = float("nan"), float("inf")


class TTY(io.StringIO):
    """A captured stream that claims to be a terminal, so the progress bar is shown."""

    def isatty(self) -> bool:
        return True


def logger(tmp_path: Path, **kw) -> MetricsLogger:
    kw = {"total_steps": 10, "plots": False, "progress": False, "stream": io.StringIO()} | kw
    return MetricsLogger(tmp_path / "run", **kw)


def series(panel, name: str) -> list[float]:
    return list(panel.series[name][1])


PPO_STEP = {
    "reward": 0.25,
    "loss": 0.1,
    "entropy": 2.5,
    "grad_norm": 0.5,
    "ppo/kl": 0.02,
    "ppo/clip_frac": 0.125,
    "ppo/value_clip_frac": 0.25,
    "ppo/value_loss": 0.75,
    "ppo/value_grad_norm": 1.5,
    "ppo/explained_variance": 0.375,
}
DPO_STEP = {
    "reward": 0.5,
    "loss": 0.69,
    "dpo/accuracy": 0.625,
    "dpo/margin": 0.04,
    "dpo/pairs": 5.0,
    "dpo/ties": 3.0,
}


def test_ppo_curves_show_the_critic_kl_and_clip_fractions(tmp_path: Path):
    """PPO logs ppo/kl and ppo/clip_frac (the table's kl and clip% columns read them), its critic's value
    loss and explained variance: curves.png must draw them, not only GRPO's keys."""
    lg = logger(tmp_path)
    lg.log(1, {**PPO_STEP, "ppo/explained_variance": NAN})  # a zero-variance batch: null, a gap
    lg.log(2, PPO_STEP)
    panels = {p.title: p for p in lg.panels()}
    assert series(panels["KL"], "kl") == [0.02, 0.02]
    assert list(panels["clip fraction"].series) == ["policy", "value"]
    assert series(panels["clip fraction"], "value") == [0.25, 0.25]
    assert series(panels["PPO critic: value loss"], "value loss") == [0.75, 0.75]
    ev = series(panels["PPO critic: explained variance"], "explained variance")
    assert math.isnan(ev[0]) and ev[1] == 0.375
    assert series(panels["grad norm"], "critic") == [1.5, 1.5]
    assert not any(t.startswith("online DPO") for t in panels)
    lg.close()


def test_online_dpo_curves_show_accuracy_margin_and_pairs(tmp_path: Path):
    lg = logger(tmp_path)
    lg.log(1, DPO_STEP)
    lg.log(2, {**DPO_STEP, "dpo/accuracy": 0.75, "dpo/pairs": 6.0, "dpo/ties": 2.0})
    panels = {p.title: p for p in lg.panels()}
    assert series(panels["online DPO: preference accuracy"], "accuracy") == [0.625, 0.75]
    assert series(panels["online DPO: margin"], "margin") == [0.04, 0.04]
    assert series(panels["online DPO: pairs"], "pairs") == [5.0, 6.0]
    assert series(panels["online DPO: pairs"], "ties") == [3.0, 2.0]
    assert "KL" not in panels and not any(t.startswith("PPO") for t in panels)
    lg.close()


@pytest.mark.parametrize(
    ("algorithm", "sections", "titles"),
    [
        (
            "ppo",
            {"grpo": {"prompts_per_step": 16, "group_size": 1}, "ppo": {"epochs": 1, "kl_coef": 0.05}},
            {"KL", "clip fraction", "PPO critic: value loss"},
        ),
        (
            "online_dpo",
            {"grpo": {"prompts_per_step": 8, "group_size": 8}},
            {"online DPO: preference accuracy", "online DPO: margin", "online DPO: pairs"},
        ),
    ],
)
def test_a_real_run_of_each_algorithm_gets_its_panels(tmp_path: Path, algorithm, sections, titles):
    """Three steps of the tiny copy-task run: the panels read the metric names the algorithm really logs."""
    from helpers.runs import launch, run_config

    cfg = run_config(tmp_path, algorithm=algorithm, train={"steps": 3, "micro_batch_size": 16}, **sections)
    records = launch(tmp_path, cfg)
    assert [r["step"] for r in records] == [1, 2, 3]
    reread = logger(tmp_path / "runs")  # run_dir = runs/run: the finished run's metrics.jsonl
    panels = {p.title: p for p in reread.panels()}
    assert titles <= set(panels), sorted(panels)
    reread.close()


@pytest.mark.parametrize(("value", "shown"), [(INF, "tok/s=inf"), (NAN, "tok/s=nan")])
def test_progress_bar_takes_non_finite_throughput(tmp_path: Path, value, shown):
    """A zero-second or failed timing gives tokens_per_s inf or NaN: the bar shows it, the run goes on."""
    out = TTY()
    lg = logger(tmp_path, progress=True, stream=out)
    lg.log(1, {"reward": 0.5, "tokens_per_s": value})
    lg.close()
    assert shown in out.getvalue()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record == {"step": 1, "reward": 0.5, "tokens_per_s": None}


def test_si_spells_non_finite_values():
    assert (si(INF), si(-INF), si(NAN), si(12345.0)) == ("inf", "-inf", "nan", "12.3k")


def fake_wandb(monkeypatch, calls: list, *, offline_fails: bool = False) -> None:
    """A wandb module whose online init fails as wandb does without an API key (non-interactive)."""

    class UsageError(Exception):
        pass

    class Run:
        def log(self, d, step):
            calls.append(("log", d, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw.get("mode")))
        if kw.get("mode") != "offline" or offline_fails:
            raise UsageError("No API key configured. Use `wandb login` to log in.")
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))


def test_wandb_without_api_key_logs_offline(tmp_path: Path, monkeypatch):
    calls: list = []
    fake_wandb(monkeypatch, calls)
    out = io.StringIO()
    lg = logger(tmp_path, wandb=True, stream=out)
    lg.log(1, {"reward": 0.5})
    lg.close()
    assert calls == [("init", None), ("init", "offline"), ("log", {"reward": 0.5}, 1), ("finish",)]
    note = [line for line in out.getvalue().splitlines() if line.startswith("note: W&B")]
    assert len(note) == 1 and "No API key configured" in note[0] and "wandb sync" in note[0]


def test_wandb_that_cannot_start_at_all_is_one_warning(tmp_path: Path, monkeypatch):
    calls: list = []
    fake_wandb(monkeypatch, calls, offline_fails=True)
    with pytest.warns(MissingBackendWarning, match="log.wandb is on but W&B did not start .*continuing without it"):
        lg = logger(tmp_path, wandb=True)
    lg.log(1, {"reward": 0.5})
    lg.close()
    assert calls == [("init", None), ("init", "offline")]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 1, "reward": 0.5}


def test_rewards_of_one_module_get_distinct_headers(tmp_path: Path):
    """Custom rewards are named `package.module:function`: cutting that to 8 characters gave every reward of
    one module the same header ("my.rewar"), so the columns could not be told apart."""
    out = io.StringIO()
    lg = logger(tmp_path, stream=out)
    names = ["my.rewards:format_ok", "my.rewards:correct", "correctness_strict", "correctness_loose"]
    lg.log(1, {"reward": 1.0} | {f"reward/{n}": v for n, v in zip(names, (0.125, 0.25, 0.375, 0.5))})
    lg.close()
    header, row = out.getvalue().splitlines()[:2]
    cells = dict(zip(header.split(), row.split()))
    assert cells["format_o"] == "0.125" and cells["correct"] == "0.250"
    assert cells["corr~ict"] == "0.375" and cells["corr~ose"] == "0.500"


def test_a_ppo_run_with_groups_prints_rows_within_the_table_width(tmp_path: Path, capsys):
    """PPO with grpo.group_size > 1 logs zero% beside the critic's columns: its rows were 143 characters,
    over MAX_WIDTH (140). The step time is left out (it stays in metrics.jsonl); the rest is shown."""
    from helpers.runs import launch, run_config

    from minigrpo.metrics_table import MAX_WIDTH

    sections = {"grpo": {"prompts_per_step": 4, "group_size": 2}, "ppo": {"epochs": 1}}
    cfg = run_config(tmp_path, algorithm="ppo", train={"steps": 1, "micro_batch_size": 8}, **sections)
    records = launch(tmp_path, cfg)
    assert "frac_zero_spread" in records[0] and "time/step" in records[0]
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("step "))
    row = lines[lines.index(header) + 1]
    assert len(header) == len(row) <= MAX_WIDTH
    assert header.split() == [
        "step", "reward", "r_std", "zero%", "fail", "len", "len_max", "trunc%", "kl", "clip%", "ent", "vloss", "ev",
        "gnorm", "lr", "loss", "tok/s", "mem", "eta",
    ]  # fmt: skip
