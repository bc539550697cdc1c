"""MetricsLogger: metrics.jsonl, resume truncation, the console table, progress bar, samples, plots, backends."""

from __future__ import annotations

import builtins
import io
import json
import math
import re
import struct
import sys
import types
from pathlib import Path

import pytest

from minigrpo.metrics import MetricsLogger, format_header, table_columns
from minigrpo.metrics_table import COLUMNS, format_row
from minigrpo.plot import matplotlib_available

NAN = float("nan")


class TTY(io.StringIO):
    """A captured stream that claims to be a terminal, so the progress bar is shown."""

    def isatty(self) -> bool:
        return True


def full_metrics(step: int) -> dict[str, float]:
    """Every metric the training loop sends, with easy-to-spot values."""
    return {
        "reward": 0.625,
        "reward_std": 0.2125,
        "reward/correctness": 0.5,
        "reward/format": 0.875,
        "reward/correctness/failures": 0.0,
        "reward/correctness/timeouts": 0.0,
        "reward/format/failures": 0.0,
        "reward/format/timeouts": 0.0,
        "frac_zero_spread": 0.375,
        "completion_len_mean": 312.4,
        "completion_len_max": 512,
        "truncated_frac": 0.0625,
        "kl": 1.23e-4,
        "clip_low_frac": 0.001,
        "clip_high_frac": 0.002,
        "clip_region_frac": 0.003,
        "entropy": 0.8123,
        "grad_norm": 0.2311,
        "lr": 1e-6,
        "loss": -0.0123,
        "ratio_min": 0.9,
        "ratio_max": 1.1,
        "tokens_per_s": 12345.0,
        "time/rollout": 8.1,
        "time/reward": 0.1,
        "time/logprobs": 1.0,
        "time/update": 3.0,
        "time/step": 12.34,
        "mem/peak_gb": 4.21,
    }


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logger(tmp_path: Path, **kw) -> MetricsLogger:
    kw = {"total_steps": 10, "plots": False, "progress": False, "stream": io.StringIO()} | kw
    return MetricsLogger(tmp_path / "run", **kw)


def test_jsonl_records_nan_as_null(tmp_path: Path):
    lg = logger(tmp_path)
    lg.log(1, {"reward": 0.5, "kl": NAN, "loss": math.inf, "completion_len_max": 7, "note": "x"})
    lg.log(2, {"reward": 0.75, "kl": 0.01})
    path = tmp_path / "run" / "metrics.jsonl"
    raw = path.read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    assert lines(path) == [
        {"step": 1, "reward": 0.5, "kl": None, "loss": None, "completion_len_max": 7, "note": "x"},
        {"step": 2, "reward": 0.75, "kl": 0.01},
    ]
    assert lg.history() == lines(path)
    lg.close()
    lg.close()  # twice is fine


def test_history_ignores_partial_line_and_resume_trims_it(tmp_path: Path):
    lg = logger(tmp_path)
    lg.log(1, {"reward": 0.1})
    lg.log(2, {"reward": 0.2})
    lg.close()
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "reward": 0.')  # the process was killed mid-write
    assert [r["step"] for r in lg.history()] == [1, 2]

    lg2 = logger(tmp_path, start_step=2)
    lg2.log(3, {"reward": 0.3})
    lg2.close()
    assert lines(path) == [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}, {"step": 3, "reward": 0.3}]


def test_truncate_after_keeps_earlier_records(tmp_path: Path):
    lg = logger(tmp_path)
    for step in range(1, 6):
        lg.log(step, {"reward": step / 10})
        if step % 2 == 0:
            lg.sample(step, f"prompt {step}", f"completion {step}", 1.0, "4")
    lg.close()
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text().splitlines()

    lg2 = logger(tmp_path, start_step=3)
    lg2.truncate_after(3)
    assert (run / "metrics.jsonl").read_text().splitlines() == before[:3]  # byte for byte
    assert [r["step"] for r in lines(run / "samples.jsonl")] == [2]
    assert [r["step"] for r in lg2.history()] == [1, 2, 3]
    lg2.log(4, {"reward": 0.44})
    lg2.close()
    assert [(r["step"], r["reward"]) for r in lines(run / "metrics.jsonl")][-2:] == [(3, 0.3), (4, 0.44)]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "samples.jsonl"]  # no temp files


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_table_header_and_formatted_values(tmp_path: Path):
    out, clock = io.StringIO(), Clock()
    lg = logger(tmp_path, total_steps=100, stream=out, clock=clock)
    clock.now += 2.0  # step 1 took 2 s: 99 steps to go at 0.5 steps/s
    lg.log(1, full_metrics(1))
    header, row = out.getvalue().splitlines()[:2]
    assert header.split() == [
        "step", "reward", "r_std", "zero%", "fail", "len", "len_max", "trunc%", "kl", "clip%", "ent", "gnorm",
        "lr", "loss", "tok/s", "t_step", "mem", "eta", "correctn",
    ]  # fmt: skip
    assert row.split() == [
        "1", "0.625", "0.212", "37.5", "0", "312", "512", "6.2", "1.2e-4", "0.3", "0.812", "0.2311",
        "1.0e-6", "-0.0123", "12.3k", "12.3", "4.2", "3m18s", "0.500",
    ]  # fmt: skip
    assert len(header) == len(row) <= 140
    ends = lambda text: [m.end() for m in re.finditer(r"\S+", text)]
    assert ends(header) == ends(row)  # values right-aligned under their headers

    clock.now += 7198.0  # 2 steps in 7200 s: 98 steps to go take 98 h
    m = full_metrics(2) | {"reward": NAN}
    del m["kl"]
    lg.log(2, m)
    assert out.getvalue().splitlines()[2].split()[1] == "nan"
    assert out.getvalue().splitlines()[2].split()[8] == "-"  # missing this step
    assert out.getvalue().splitlines()[2].split()[-2] == "98h00m"


def test_table_header_repeats_and_print_every(tmp_path: Path):
    out = io.StringIO()
    lg = logger(tmp_path, total_steps=45, print_every=2, stream=out)
    for step in range(1, 46):
        lg.log(step, {"reward": 0.5, "kl": 0.02})
    text = out.getvalue().splitlines()
    rows = [int(t.split()[0]) for t in text if not t.lstrip().startswith("step")]
    assert rows == [*range(2, 45, 2), 45]  # every 2nd step, and the last one
    assert sum(t.split()[0] == "step" for t in text) == 2  # 23 rows: a header every 20
    assert len(lines(tmp_path / "run" / "metrics.jsonl")) == 45  # JSONL gets every step


def test_table_columns_fit_and_show_per_function_rewards():
    keys = ["step", "reward", "reward/correctness", "reward/format", "reward/total", "reward/total_std", "kl"]
    # reward/total(_std) (what rewards.py reports) fill the reward / r_std columns when reward is absent
    assert format_header(table_columns(keys)).split() == ["step", "reward", "r_std", "kl", "correctn", "format"]
    many = list(full_metrics(1)) + ["step", "_fail", "_eta"] + [f"reward/fn{i}" for i in range(10)]
    assert len(format_header(table_columns(many))) <= 140


def test_notes_for_zero_advantage_and_reward_failures(tmp_path: Path):
    out = io.StringIO()
    lg = logger(tmp_path, stream=out)
    lg.log(1, {"reward": 0.0, "frac_zero_spread": 1.0, "reward/c/failures": 2.0, "reward/c/timeouts": 1.0})
    lg.log(2, {"reward": 0.0, "frac_zero_spread": 1.0, "reward/c/failures": 0.0, "reward/c/timeouts": 0.0})
    text = out.getvalue()
    assert text.count("every advantage") == 1 and "step 1: every group got identical rewards" in text
    assert text.count("reward functions failed") == 1 and "reward/c/failures, reward/c/timeouts" in text
    row1 = text.splitlines()[1].split()
    assert row1[:4] == ["1", "0.000", "100", "3"]  # step, reward, zero%, fail


def test_progress_bar(tmp_path: Path):
    out = TTY()
    lg = logger(tmp_path, total_steps=10, start_step=4, progress=True, stream=out)
    assert lg._bar is not None and lg._bar.n == 4
    lg.log(5, {"reward": 0.625, "tokens_per_s": 2500.0})
    lg.log(6, {"reward": 0.75, "tokens_per_s": 2600.0})
    assert lg._bar.n == 6
    lg.close()
    text = out.getvalue()
    assert "6/10" in text and "reward=0.750 tok/s=2600" in text
    assert "eta" not in text.splitlines()[0]  # the bar shows the ETA, the table does not
    assert "reward" in text and "0.750" in text


def test_sample_block_and_jsonl(tmp_path: Path):
    out = io.StringIO()
    lg = logger(tmp_path, stream=out)
    prompt = "HEAD" + "x" * 300 + "What is 2+2?"
    lg.sample(10, prompt, "<think>2+2=4</think> 4", 1.0, answer="4")
    lg.sample(11, "p", "c" * 5000, NAN)
    text = out.getvalue()
    assert "sample | step 10 | reward 1.000" in text and "sample | step 11 | reward -" in text
    assert prompt[-200:] in text and "HEAD" not in text
    assert "<think>2+2=4</think> 4" in text and "answer: 4" in text
    assert "[... 3000 characters ...]" in text
    recs = lines(tmp_path / "run" / "samples.jsonl")
    completion = "<think>2+2=4</think> 4"
    assert recs[0] == {"step": 10, "reward": 1.0, "prompt": prompt, "completion": completion, "answer": "4"}
    assert recs[1]["reward"] is None and len(recs[1]["completion"]) == 5000


def test_a_chat_prompt_is_shown_as_its_messages(tmp_path: Path):
    """A prompt stored as chat messages printed and saved as its Python repr ("[{'role': ...")."""
    out = io.StringIO()
    lg = logger(tmp_path, stream=out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    lg.sample(3, messages, "4", 1.0)
    assert "prompt: system: Be brief.\nuser: What is 2+2?\n" in out.getvalue() and "{'role'" not in out.getvalue()
    assert lines(tmp_path / "run" / "samples.jsonl")[0]["prompt"] == "system: Be brief.\nuser: What is 2+2?"


def test_disabled_writes_nothing(tmp_path: Path):
    out = TTY()
    lg = MetricsLogger(tmp_path / "run", total_steps=5, enabled=False, stream=out, tensorboard=True, wandb=True)
    lg.log(1, {"reward": 1.0})
    lg.sample(1, "p", "c", 1.0)
    lg.truncate_after(0)
    assert lg.history() == []
    lg.close()
    assert not (tmp_path / "run").exists() and out.getvalue() == ""


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(not matplotlib_available(), reason="needs matplotlib (the plots extra)")
def test_plots_every_n_steps_and_at_close(tmp_path: Path):
    lg = logger(tmp_path, total_steps=10, plots=True, plot_every=3)
    png = tmp_path / "run" / "curves.png"
    lg.log(1, full_metrics(1))
    lg.log(2, full_metrics(2))
    assert not png.exists()
    lg.log(3, full_metrics(3))
    assert png.exists()
    first = png.read_bytes()
    titles = [p.title for p in lg.panels()]
    assert titles == [
        "reward", "completion length", "KL", "clip fraction", "zero spread, truncated", "loss", "entropy", "grad norm",
    ]  # fmt: skip
    assert list(lg.panels()[0].series) == ["total", "correctness", "format"]
    assert png_size(png) == (1200, 40 + 3 * 300)  # title band + 3 rows of 3 panels
    lg.log(4, full_metrics(4))
    lg.close()
    assert png.read_bytes() != first  # redrawn with step 4 at close


def test_episode_metrics_get_their_panels(tmp_path: Path):
    """A multi-turn run's env/ metrics are drawn (tool-use share must be watched); a plain run has none."""
    lg = logger(tmp_path, total_steps=4)
    for step in (1, 2):
        episodes = {"env/tool_use_frac": 0.4 * step, "env/tool_failure_frac": 0.0, "env/turns_mean": 1.5}
        lg.log(step, {**full_metrics(step), **episodes})
    panels = {p.title: p for p in lg.panels()}
    assert list(panels["episodes: tool use"].series) == ["tool-use share", "tool failures"]
    assert panels["episodes: tool use"].series["tool-use share"] == ([1, 2], [0.4, 0.8])
    assert list(panels["episodes: per episode"].series) == ["turns"]  # tool calls were never logged
    lg.close()


def test_missing_backends_warn_not_crash(tmp_path: Path, monkeypatch):
    real_import = builtins.__import__

    def no_backends(name, *args, **kwargs):
        if name.startswith(("wandb", "tensorboard", "torch.utils.tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_backends)
    with pytest.warns(RuntimeWarning) as caught:
        lg = logger(tmp_path, tensorboard=True, wandb=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "TensorBoard is not installed" in messages and "wandb is not installed" in messages
    # shown as one `warning:` line each under run_cli (errors._show_warning), not Python's two
    assert all(issubclass(w.category, UserWarning) for w in caught)
    lg.log(1, {"reward": 1.0})
    lg.close()
    assert lines(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "reward": 1.0}]


def test_backends_receive_finite_scalars(tmp_path: Path, monkeypatch):
    calls: list[tuple] = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("tb_init", Path(log_dir).name))

        def add_scalar(self, k, v, step):
            calls.append(("tb", k, v, step))

        def close(self):
            calls.append(("tb_close",))

    class Run:
        def log(self, d, step):
            calls.append(("wandb", d, step))

        def finish(self):
            calls.append(("wandb_finish",))

    def init(**kw):
        calls.append(("wandb_init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    lg = logger(tmp_path, tensorboard=True, wandb=True, wandb_project="p", config={"lr": 1e-6})
    lg.log(1, {"reward": 0.5, "kl": NAN})
    lg.close()
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    kw = calls[1][1]
    assert kw == {"project": "p", "config": {"lr": 1e-6}, "dir": str(tmp_path / "run"), "id": run_id, "resume": "allow"}
    assert calls[0] == ("tb_init", "tensorboard")
    assert calls[2:] == [("tb", "reward", 0.5, 1), ("wandb", {"reward": 0.5}, 1), ("tb_close",), ("wandb_finish",)]


def test_a_resumed_run_hides_the_redone_steps_from_tensorboard(tmp_path: Path, monkeypatch):
    """Resumed after step 4, the run logs step 5 again: TensorBoard must purge the events of steps >= 5
    that the interrupted run wrote (SummaryWriter's purge_step), as metrics.jsonl drops their records."""
    opened: list[dict] = []

    class Writer:
        def __init__(self, log_dir, **kwargs):
            opened.append({"log_dir": Path(log_dir).name, **kwargs})

        def add_scalar(self, k, v, step):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger(tmp_path, tensorboard=True).close()
    logger(tmp_path, tensorboard=True, start_step=4).close()
    assert opened == [{"log_dir": "tensorboard"}, {"log_dir": "tensorboard", "purge_step": 5}]


def test_without_matplotlib_plots_are_off_with_one_note(tmp_path: Path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    written: list[tuple] = []

    class Writer:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, k, v, step):
            written.append((k, v, step))

        def close(self):
            pass

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    out = io.StringIO()
    lg = logger(tmp_path, total_steps=4, plots=True, plot_every=1, tensorboard=True, stream=out)
    for step in range(1, 5):
        lg.log(step, {"reward": step / 4})
    lg.close()
    text = out.getvalue()
    assert text.count("plots are off") == 1
    assert "matplotlib is not installed (pip install matplotlib, or pip install 'minigrpo[plots]')" in text
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # no curves.png, no temp files
    assert [r["reward"] for r in lines(run / "metrics.jsonl")] == [0.25, 0.5, 0.75, 1.0]
    assert written == [("reward", 0.25, 1), ("reward", 0.5, 2), ("reward", 0.75, 3), ("reward", 1.0, 4)]


def test_note_for_a_reward_that_scored_no_row(tmp_path: Path):
    out = io.StringIO()
    lg = logger(tmp_path, stream=out)
    lg.log(1, {"reward": 0.5, "reward/correctness": 0.5, "reward/judge": NAN, "reward/judge/timeouts": 8.0})
    lg.log(2, {"reward": 0.5, "reward/correctness": NAN, "reward/judge": NAN})
    text = out.getvalue()
    assert text.count("reward 'judge' scored no row") == 1 and "note: step 1: reward 'judge'" in text
    assert "note: step 2: reward 'correctness' scored no row" in text
    assert lines(tmp_path / "run" / "metrics.jsonl")[0]["reward/judge"] is None


def test_jsonl_stays_valid_for_numpy_torch_huge_ints_and_odd_keys(tmp_path: Path):
    """Whatever a step sends, metrics.jsonl gets one readable JSON line and the run goes on: integer
    scalars stay ints, ints beyond the float range (which json cannot read back) become null."""
    np, torch = pytest.importorskip("numpy"), pytest.importorskip("torch")
    out = io.StringIO()
    lg = logger(tmp_path, stream=out)
    sent = {
        "reward": np.float32(0.5),
        "kl": torch.tensor(float("nan")),
        "completion_len_max": np.int64(512),
        "tokens": torch.tensor(3),
        "big": 10**30,
        "beyond_float": 10**400,
        "digits": -(10**5000),
        7: 0.25,
    }
    lg.log(1, sent)
    lg.log(2, {"reward": 0.75})
    lg.close()
    path = tmp_path / "run" / "metrics.jsonl"
    first = lines(path)[0]
    assert first == {
        "step": 1, "reward": 0.5, "kl": None, "completion_len_max": 512, "tokens": 3, "big": 10**30,
        "beyond_float": None, "digits": None, "7": 0.25,
    }  # fmt: skip
    assert isinstance(first["completion_len_max"], int) and isinstance(first["tokens"], int)
    assert [r["step"] for r in lg.history()] == [1, 2]
    assert out.getvalue().splitlines()[1].split()[:2] == ["1", "0.500"]


def test_truncate_after_skips_lines_without_a_step(tmp_path: Path):
    lg = logger(tmp_path)
    lg.log(1, {"reward": 0.1})
    lg.close()
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": null, "reward": 0.2}\n["not", "a", "record"]\n{"step": "3"}\n{"step": 2, "reward": 0.3}\n')
    assert [r["step"] for r in lg.history()] == [1, 2]
    lg2 = logger(tmp_path, start_step=1)
    lg2.truncate_after(1)  # raised TypeError on the null step
    lg2.close()
    assert lines(path) == [{"step": 1, "reward": 0.1}]


def test_samples_the_console_cannot_encode_do_not_stop_the_run(tmp_path: Path):
    """An ASCII console (or a lone surrogate on a UTF-8 one) shows escapes; samples.jsonl keeps the text."""
    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii")
    lg = logger(tmp_path, stream=ascii_out)
    lg.sample(10, "Combien font 2+2 ?", "Réponse : 4 \u2713 \ud800", 1.0, answer="4")
    lg.sample(20, "p", "c", NAN, answer=NAN)  # a non-text answer is stored as text
    lg.close()
    shown = raw.getvalue().decode("ascii")
    assert "R\\xe9ponse : 4 \\u2713 \\ud800" in shown and "sample | step 20 | reward -" in shown
    recs = lines(tmp_path / "run" / "samples.jsonl")
    assert recs[0]["completion"] == "Réponse : 4 \u2713 \ud800" and recs[0]["step"] == 10
    assert recs[1] == {"step": 20, "reward": None, "prompt": "p", "completion": "c", "answer": "nan"}

    utf8_out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    lg = logger(tmp_path / "b", stream=utf8_out)
    lg.sample(1, "p", "x \ud800 é", 0.5)
    lg.close()
    assert lines(tmp_path / "b" / "run" / "samples.jsonl")[0]["completion"] == "x \ud800 é"


MAGNITUDES = [0.0, 1e-12, -1e-12, 3.3e-5, -0.0047, 0.5, -0.999, 1.5, -12.5, 999.96, -1234.5678, 9999.6, 54321.0]
MAGNITUDES += [999999.0, -2.5e8, 1e9, 1e12, -1e12, math.inf, -math.inf, NAN]


@pytest.mark.parametrize("value", MAGNITUDES)
def test_table_columns_stay_aligned_for_any_magnitude(tmp_path: Path, value: float):
    keys = [k for c in COLUMNS for k in c.keys] + ["reward/correctness"]
    cols = table_columns(keys, max_width=1000)
    header, row = format_header(cols), format_row(cols, dict.fromkeys(keys, value))
    ends = lambda text: [m.end() for m in re.finditer(r"\S+", text)]
    assert len(row) == len(header) and ends(row) == ends(header), f"{value}: {header!r} / {row!r}"


def test_table_values_keep_their_magnitude():
    """Values wider than their column lose decimals, then take an SI suffix or an exponent; never wrong numbers."""
    cols = table_columns(["step", "reward", "frac_zero_spread", "tokens_per_s", "grad_norm", "_eta", "loss"])
    row = lambda **v: dict(zip([c.header for c in cols], format_row(cols, v).split(), strict=True))
    got = row(step=3, reward=-1234.5678, frac_zero_spread=1.5, tokens_per_s=999999.0, grad_norm=1e-12, _eta=3e6)
    assert got == {
        "step": "3", "reward": "-1234.6", "zero%": "150.0", "tok/s": "1.0M", "gnorm": "1e-12", "eta": "34d17h",
        "loss": "-",
    }  # fmt: skip
    got = row(step=4, reward=54321.0, frac_zero_spread=0.9996, tokens_per_s=9999.6, loss=2.5e12, _eta=4e5)
    assert [got[k] for k in ("reward", "zero%", "tok/s", "loss", "eta")] == ["54321.0", "100", "10.0k", "2.5T", "4d15h"]
