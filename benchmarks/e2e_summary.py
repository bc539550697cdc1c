"""The parent side of bench_e2e.py: each row's medians, the ratios against TRL, the learning summary
over seeds and the reward plot. Pure functions of the rows (dicts), so the CPU tests check them."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def summarize(row: dict, measure_from: int) -> dict:
    """Medians over the measured steps; steps per hour; the peak of the measured steps."""
    steps = [s for s in row.get("steps", []) if s["step"] >= measure_from] or row.get("steps", [])
    if row["status"] != "ok" or not steps:
        return {}

    def med(key):
        vals = [s[key] for s in steps if s.get(key) is not None and not math.isnan(s[key])]
        return statistics.median(vals) if vals else None

    step_s = med("step_s")
    tok = [s["completion_tokens"] / s["step_s"] for s in steps if not math.isnan(s["completion_tokens"])]
    peaks = [s["peak_gib"] for s in steps if s.get("peak_gib") is not None]
    # fmt: off
    return {
        "measured_steps": [s["step"] for s in steps], "step_s": step_s,
        "rollout_s": med("rollout_s"), "update_s": med("update_s"),
        "tokens_per_s": statistics.median(tok) if tok else None, "peak_gib": max(peaks) if peaks else None,
        "steps_per_hour": 3600 / step_s if step_s else None,
    }
    # fmt: on


def add_ratios(rows: list[dict]) -> None:
    """ours_x: ours' steps/hour over the row's (ours-vllm against trl-vllm); ours_mem: peak ratio."""
    by = {(r["case"], r["provider"], r.get("seed")): r for r in rows}
    for r in rows:
        if not r["provider"].startswith("trl") or not r.get("steps_per_hour"):
            continue
        ref = by.get((r["case"], "ours-vllm" if r["provider"] == "trl-vllm" else "ours", r.get("seed")), {})
        if ref.get("steps_per_hour"):
            r["ours_x"] = ref["steps_per_hour"] / r["steps_per_hour"]
        if ref.get("peak_gib") and r.get("peak_gib"):
            r["ours_mem"] = ref["peak_gib"] / r["peak_gib"]
        if "ours_x" in r:
            r["target_met"] = r["ours_x"] >= 3 and r.get("ours_mem", 0.0) <= 1.0


def learning(rows: list[dict], last: int = 10) -> list[dict]:
    """Per provider, over its seeds: the mean reward of the first 5 and of the last `last` steps, and
    the standard error of the latter (across seeds when there are several, else over the steps)."""
    out = []
    for provider in dict.fromkeys(r["provider"] for r in rows):
        runs = [r["reward_per_step"] for r in rows if r["provider"] == provider and r.get("reward_per_step")]
        runs = [run for run in runs if None not in run and len(run) >= 2]
        if not runs:
            continue
        tails = [statistics.fmean(run[-last:]) for run in runs]
        spread = tails if len(runs) > 1 else runs[0][-last:]
        se = statistics.stdev(spread) / math.sqrt(len(spread)) if len(spread) > 1 else None
        # fmt: off
        out.append({
            "provider": provider, "seeds": len(runs), "first5": statistics.fmean(statistics.fmean(r[:5]) for r in runs),
            f"last{last}": statistics.fmean(tails), "se": se, f"last{last}_per_seed": tails,
        })
        # fmt: on
    ours = next((x for x in out if x["provider"] == "ours"), None)
    for x in out:  # the target: ours at least the reference's mean minus one standard error
        if ours is not None and x["provider"].startswith("trl") and x["se"] is not None:
            x["ours_within_1se"] = ours[f"last{last}"] >= x[f"last{last}"] - x["se"]
    return out


def plot_rewards(rows: list[dict], path: Path, title: str) -> None:
    """One line per (provider, seed), a colour per provider; with several seeds, their mean drawn thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for i, provider in enumerate(providers):
        runs = [r for r in rows if r["provider"] == provider]
        curves = [[(s["step"], s["reward"]) for s in r.get("steps", []) if s.get("reward") is not None] for r in runs]
        curves = [c for c in curves if c]
        for j, pts in enumerate(curves):
            single = len(curves) == 1
            label = provider if single else (f"{provider} (seeds)" if j == 0 else None)
            ax.plot(*zip(*pts), color=f"C{i}", alpha=0.8 if single else 0.3, lw=1.5 if single else 0.8, label=label)
        if len(curves) > 1 and len({len(c) for c in curves}) == 1:
            steps = [p[0] for p in curves[0]]
            mean = [statistics.fmean(c[k][1] for c in curves) for k in range(len(steps))]
            ax.plot(steps, mean, color=f"C{i}", lw=2.2, label=f"{provider}, mean of {len(curves)}")
    ax.set(xlabel="step", ylabel="mean reward", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
