"""What the user sees during a run: metrics.jsonl, a console table, a progress bar, samples, PNG curves.

One MetricsLogger per run (only the main rank has enabled=True). Per step, `log(step, metrics)`:
  - appends {"step": step, **metrics} to run_dir/metrics.jsonl (one write of one full line; NaN/inf
    become null), so a killed run leaves at most a partial last line, which reads ignore and the next
    open trims;
  - moves the tqdm bar (ETA, reward, tokens/s) when the stream is a terminal;
  - prints a table row (minigrpo.metrics_table) every `print_every` steps through tqdm.write (a header
    every 20 rows);
  - redraws run_dir/curves.png every `plot_every` steps and at close (minigrpo.plot, with matplotlib;
    without it one note says that plots are off and how to get them);
  - mirrors the scalars to TensorBoard / W&B when enabled and installed (W&B logs offline, with one note,
    when it cannot log online: no API key, no network).

The table answers "why is the loss 0?" at a glance: zero% is the share of groups whose rewards have
no spread (zero advantage, no policy gradient), fail counts reward-function failures and timeouts,
clip% the tokens in the clipped region, trunc% the completions cut at max_new_tokens. Per-function
rewards are appended as the last columns while the line stays within 140 characters; all of them
are always in metrics.jsonl and curves.png. Columns appear only for metrics the loop sends. What each
metric name means, and when a run logs it: README.md, section "Metrics".

`step` is the 1-based index of the optimizer step just finished; a run resumed from a checkpoint
taken after step k passes start_step=k and calls truncate_after(k) to drop the lost steps' records.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from minigrpo.atomic import write_atomic
from minigrpo.metrics_table import (
    HEADER_EVERY,
    Column,
    format_header,
    format_row,
    reward_function_names,
    si,
    table_columns,
)
from minigrpo.plot import PLOTS_OFF, Panel, matplotlib_available, write_line_plots

SAMPLE_PROMPT_CHARS = 200  # the tail of the prompt shown with a sample
SAMPLE_COMPLETION_CHARS = 2000  # longer completions are shown with their middle elided
_FAIL_KEY = re.compile(r"reward/[^/]+/(failures|timeouts)")

# The curves.png panels after the reward one: (title, y axis down to 0, [(series name, metric keys: the first
# one a record has is drawn)]). GRPO's panels first, then those of multi-turn episodes (env:), PPO's critic
# and online DPO's pairs; a panel appears only when a run logs one of its metrics.
PANELS: list[tuple[str, bool, list[tuple[str, tuple[str, ...]]]]] = [
    (
        "completion length",
        True,
        [("mean", ("completion_len_mean",)), ("max", ("completion_len_max",)), ("ended", ("ended_len_mean",))],
    ),
    ("KL", True, [("kl", ("kl", "ppo/kl"))]),  # PPO: the per-token penalty's KL to the reference
    (
        "clip fraction",
        True,
        [
            ("low", ("clip_low_frac",)),
            ("high", ("clip_high_frac",)),
            ("region", ("clip_region_frac",)),
            ("policy", ("ppo/clip_frac",)),
            ("value", ("ppo/value_clip_frac",)),
        ],
    ),
    (
        "zero spread, truncated",
        True,
        [("zero-spread groups", ("frac_zero_spread",)), ("truncated", ("truncated_frac",))],
    ),
    ("loss", False, [("loss", ("loss",))]),
    ("entropy", True, [("entropy", ("entropy",))]),
    ("grad norm", True, [("grad_norm", ("grad_norm",)), ("critic", ("ppo/value_grad_norm",))]),
    (
        "episodes: tool use",
        True,
        [("tool-use share", ("env/tool_use_frac",)), ("tool failures", ("env/tool_failure_frac",))],
    ),
    ("episodes: per episode", True, [("turns", ("env/turns_mean",)), ("tool calls", ("env/tool_calls_mean",))]),
    ("PPO critic: value loss", True, [("value loss", ("ppo/value_loss",))]),
    ("PPO critic: explained variance", True, [("explained variance", ("ppo/explained_variance",))]),
    ("online DPO: preference accuracy", True, [("accuracy", ("dpo/accuracy",))]),
    ("online DPO: margin", True, [("margin", ("dpo/margin",))]),
    ("online DPO: pairs", True, [("pairs", ("dpo/pairs",)), ("ties", ("dpo/ties",))]),
]


def _to_float(v: Any) -> float | None:
    """v as a float (a number, a numpy scalar, a one-element tensor), or None for anything else;
    an int beyond the float range is +-inf."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf
    except (TypeError, ValueError, RuntimeError):
        return None


def _to_int(v: Any) -> int | None:
    """v as an int when it is an integer (Python, numpy or a torch integer scalar), else None."""
    if isinstance(v, float):
        return None
    try:
        return int(operator.index(v))
    except (TypeError, ValueError, RuntimeError):
        return None


def _json_value(v: Any) -> Any:
    """JSON-safe value: integers (numpy and torch ones too) stay ints, other numbers become floats,
    non-finite ones null (an int beyond the float range too: JSON readers cannot hold it), other
    objects their str()."""
    if v is None or isinstance(v, str):
        return v
    f = _to_float(v)
    if f is None:
        return str(v)
    if not math.isfinite(f):
        return None
    i = _to_int(v)
    return f if i is None else i


def _complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of a file ([] if missing): a partial last line is left out."""
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.split("\n")[:-1]


def _parse(line: str) -> dict | None:
    """The record on one line, or None when it is no JSON object with a numeric "step"."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or an int too long for Python to read
        return None
    if not isinstance(rec, dict) or isinstance(rec.get("step"), bool):
        return None
    return rec if isinstance(rec.get("step"), (int, float)) else None


def _trim_partial_tail(path: Path) -> None:
    """Cut a partial last line (left by a killed process) so that the next append starts a fresh line."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)


def _encodable(text: str, stream: Any) -> str:
    """text with every character the stream's encoding cannot write (a lone surrogate, or any non-ASCII
    character on an ASCII console) as a backslash escape: a sample's text never stops the run."""
    encoding = getattr(stream, "encoding", None)
    if not encoding:  # a text buffer such as io.StringIO takes any str
        return text
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode(encoding, errors="backslashreplace").decode(encoding)
    except LookupError:  # an encoding Python does not know: leave it to the stream
        pass
    return text


class MissingBackendWarning(UserWarning, RuntimeWarning):
    """An optional logging backend is on but not installed (a user warning: one `warning:` line)."""


def _missing(option: str, what: str, package: str, err: ImportError) -> None:
    """Warn that an optional backend is on but not installed; the run goes on without it."""
    msg = f"{option} is on but {what} is not installed ({err}); continuing without it (pip install {package})"
    warnings.warn(msg, MissingBackendWarning, stacklevel=4)


class MetricsLogger:
    """Step metrics of one run to metrics.jsonl, the console (table + progress bar), curves.png,
    samples.jsonl and optionally TensorBoard / W&B. With enabled=False every method does nothing."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        print_every: int = 1,
        plots: bool = True,
        plot_every: int = 10,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str | None = None,
        progress: bool = True,
        config: dict | None = None,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """stream: where the table, samples and bar go (None: sys.stdout at construction). The bar is shown
        only when progress is on and the stream is a terminal; otherwise the table gains an eta column.
        clock: seconds for the eta (a test passes its own)."""
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.start_step = total_steps, start_step
        self.print_every, self.plots, self.plot_every = max(print_every, 1), plots, max(plot_every, 1)
        self.stream = sys.stdout if stream is None else stream
        self.metrics_path, self.samples_path = self.run_dir / "metrics.jsonl", self.run_dir / "samples.jsonl"
        self.plot_path = self.run_dir / "curves.png"
        self._files: dict[Path, Any] = {}
        self._records = self.history()  # earlier steps of a resumed run, for the curves
        self._keys: list[str] = []  # metric names seen, in first-seen order (+ "_fail" / "_eta")
        self._cols: list[Column] = []
        self._rows = 0  # table rows since the last header
        self._notes: set[str] = set()
        self._clock = clock
        self._t0 = clock()
        self._closed = False
        self._bar = None
        if progress and getattr(self.stream, "isatty", lambda: False)():
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True)
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(wandb_project, config) if wandb else None
        if self.plots and not matplotlib_available():
            self.plots = False
            self._write(f"note: {PLOTS_OFF}.")

    # ---- optional backends ------------------------------------------------------------------------
    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            return _missing("log.tensorboard", "TensorBoard", "tensorboard", e)
        if not self.start_step:
            return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        # a resumed run redoes the steps after its checkpoint: TensorBoard hides the old events from that
        # step on, as truncate_after drops their records from metrics.jsonl (no step shown twice)
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=self.start_step + 1)

    def _open_wandb(self, project: str | None, config: dict | None) -> Any:
        try:
            import wandb
        except ImportError as e:
            return _missing("log.wandb", "wandb", "wandb", e)
        id_file = self.run_dir / "wandb_run_id"  # a resumed run continues the same W&B run
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        run_id = id_file.read_text().strip()
        kwargs = {"project": project or "minigrpo", "config": config, "dir": str(self.run_dir), "id": run_id}
        try:
            return wandb.init(**kwargs, resume="allow")
        except Exception as e:  # no API key, no network: W&B's own error must not end the run
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
        try:
            run = wandb.init(**kwargs, resume="allow", mode="offline")
        except Exception as e:
            msg = f"log.wandb is on but W&B did not start ({reason}; offline: {e!r}); continuing without it"
            warnings.warn(msg, MissingBackendWarning, stacklevel=3)
            return None
        self._write(
            f"note: W&B could not log online ({reason}); logging offline to {self.run_dir / 'wandb'} "
            "(upload it later with `wandb sync`)."
        )
        return run

    # ---- files --------------------------------------------------------------------------------------
    def _append(self, path: Path, record: dict) -> None:
        """One write() of one full JSON line, unbuffered: a kill leaves at most a partial last line."""
        f = self._files.get(path)
        if f is None:
            _trim_partial_tail(path)
            f = self._files[path] = open(path, "ab", buffering=0)  # noqa: SIM115 (kept open for the run)
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        f.write(line.encode("utf-8", errors="backslashreplace"))  # a lone surrogate stays valid JSON

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def history(self) -> list[dict]:
        """All step records in metrics.jsonl (null where a value was NaN/inf); a partial last line is ignored."""
        if not self.enabled:
            return []
        return [r for r in map(_parse, _complete_lines(self.run_dir / "metrics.jsonl")) if r is not None]

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps > step from metrics.jsonl and samples.jsonl (on resume: those steps
        will be redone). Each file is rewritten atomically; earlier records are kept byte for byte."""
        if not self.enabled:
            return
        self._close_files()
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                keep = [
                    ln for ln in _complete_lines(path) if (r := _parse(ln)) is not None and r.get("step", 0) <= step
                ]
                write_atomic(path, "".join(line + "\n" for line in keep))
        self._records = [r for r in self._records if r.get("step", 0) <= step]

    # ---- per step -----------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record the metrics of one finished step (see the module docstring for what happens)."""
        if not self.enabled:
            return
        metrics = {str(k): v for k, v in metrics.items() if str(k) != "step"}
        record = {"step": int(step)} | {k: _json_value(v) for k, v in metrics.items()}
        self._append(self.metrics_path, record)
        self._records.append(record)
        values = {k: f for k, v in metrics.items() if (f := _to_float(v)) is not None} | {"step": float(step)}
        fails = [k for k in values if _FAIL_KEY.fullmatch(k)]
        if fails:
            values["_fail"] = sum(values[k] for k in fails if math.isfinite(values[k]))
        if self._bar is None and step > self.start_step:
            rate = (step - self.start_step) / max(self._clock() - self._t0, 1e-9)
            values["_eta"] = max(self.total_steps - step, 0) / rate
        self._keys += [k for k in values if k not in self._keys]

        if self._bar is not None:
            post = [f"reward={values[k]:.3f}" for k in ("reward", "reward/total") if k in values][:1]
            post += [f"tok/s={si(values['tokens_per_s'])}"] if "tokens_per_s" in values else []
            self._bar.set_postfix_str(" ".join(post), refresh=False)
            self._bar.update(max(min(step, self.total_steps) - self._bar.n, 0))
        if step % self.print_every == 0 or step >= self.total_steps:
            self._print_row(values)
        self._notes_for(step, values)
        self._tb_wandb(step, values)
        if self.plots and step % self.plot_every == 0:
            self._plot(step)

    def _write(self, text: str) -> None:
        tqdm.write(_encodable(text, self.stream), file=self.stream)
        self.stream.flush()  # rows must show up at once when the output goes to a file or a pipe

    def _print_row(self, values: Mapping[str, float]) -> None:
        cols = table_columns(self._keys)
        if [c.keys for c in cols] != [c.keys for c in self._cols] or self._rows >= HEADER_EVERY:
            self._cols, self._rows = cols, 0
            self._write(format_header(cols))
        self._write(format_row(cols, values))
        self._rows += 1

    def _notes_for(self, step: int, values: Mapping[str, float]) -> None:
        """One-time hints for the usual "why is nothing learned" causes."""
        zero_spread = values.get("kept/frac_zero_spread", values.get("frac_zero_spread", 0))  # what was trained on
        if zero_spread >= 1 and "zero" not in self._notes:
            self._notes.add("zero")
            self._write(
                f"note: step {step}: every group got identical rewards (zero%=100), so no completion is "
                "better than another (GRPO: every advantage is 0; online DPO: no pair): no signal in this "
                "batch, though the optimizer still steps on its moments (all right or all wrong? check the "
                "samples)."
            )
        for name in reward_function_names(list(values)):
            if math.isnan(values[f"reward/{name}"]) and f"unscored/{name}" not in self._notes:
                self._notes.add(f"unscored/{name}")
                self._write(
                    f"note: step {step}: reward {name!r} scored no row (each returned None/NaN, failed or timed "
                    f"out), so it adds nothing to the reward; reward/{name}/nones, failures and timeouts in "
                    "metrics.jsonl say which."
                )
        if values.get("_fail", 0) > 0 and "fail" not in self._notes:
            self._notes.add("fail")
            bad = [k for k in values if _FAIL_KEY.fullmatch(k) and values[k] > 0]
            self._write(
                f"note: step {step}: reward functions failed or timed out ({', '.join(bad)}); those "
                "completions are masked. Counts per step are in metrics.jsonl."
            )

    def _tb_wandb(self, step: int, values: Mapping[str, float]) -> None:
        scalars = {k: v for k, v in values.items() if not k.startswith("_") and k != "step" and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    # ---- curves -------------------------------------------------------------------------------------
    def panels(self) -> list[Panel]:
        """The curves.png panels for the records so far (PANELS, then per-function rewards in the first);
        panels and series without data are left out."""
        recs = self._records
        steps = [r["step"] for r in recs]
        keys = list(dict.fromkeys(k for r in recs for k in r))
        per_function = [(fn, (f"reward/{fn}",)) for fn in reward_function_names(keys)]
        rewards = [("total", ("reward", "reward/total")), *per_function]
        panels = []
        for title, include_zero, series in [("reward", False, rewards), *PANELS]:
            data = {}
            for name, candidates in series:
                ys = [_to_float(next((r[k] for k in candidates if k in r), None)) for r in recs]
                if any(y is not None and math.isfinite(y) for y in ys):
                    data[name] = (steps, [math.nan if y is None else y for y in ys])
            if data:
                panels.append(Panel(title, data, include_zero))
        return panels

    def _plot(self, step: int) -> None:
        """Redraw curves.png; a plotting error is reported once and never stops training."""
        panels = self.panels()
        if not panels:
            return
        try:
            write_line_plots(self.plot_path, panels, title=f"{self.run_dir.name}: step {step}/{self.total_steps}")
        except Exception as e:  # the curves are a convenience, the run matters more
            if "plot" not in self._notes:
                self._notes.add("plot")
                warnings.warn(f"writing {self.plot_path} failed: {e!r}", RuntimeWarning, stacklevel=3)

    # ---- samples and shutdown -----------------------------------------------------------------------
    def sample(
        self, step: int, prompt: str | list, completion: str, reward: float | None, answer: str | None = None
    ) -> None:
        """Print one sampled completion (the prompt's tail, the completion, the reference answer) and
        append it in full to samples.jsonl; a prompt of chat messages shows as "role: content" lines."""
        if not self.enabled:
            return
        r = _to_float(reward)
        r = None if r is None or not math.isfinite(r) else r
        prompt, completion = _prompt_text(prompt), str(completion)
        answer = None if answer is None else str(answer)
        self._append(
            self.samples_path,
            {"step": int(step), "reward": r, "prompt": prompt, "completion": completion, "answer": answer},
        )
        tail = prompt[-SAMPLE_PROMPT_CHARS:]
        shown = completion
        if len(shown) > SAMPLE_COMPLETION_CHARS:
            half = SAMPLE_COMPLETION_CHARS // 2
            shown = f"{shown[:half]}\n[... {len(shown) - 2 * half} characters ...]\n{shown[-half:]}"
        head = f"---- sample | step {step} | reward {'-' if r is None else f'{r:.3f}'} "
        lines = [
            head + "-" * max(60 - len(head), 4),
            f"prompt: {'...' if len(prompt) > len(tail) else ''}{tail}",
            "completion:",
            shown,
        ]
        if answer is not None:
            lines.append(f"answer: {answer}")
        self._write("\n".join(lines))

    def close(self) -> None:
        """Final curves, close the bar, files and backends. Safe to call twice."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self.plots and self._records:
            self._plot(self._records[-1]["step"])
        if self._bar is not None:
            self._bar.close()
        self._close_files()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prompt_text(prompt: Any) -> str:
    """A prompt as text to read: chat messages as one "role: content" line each (their repr otherwise)."""
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in prompt)
    return str(prompt)
