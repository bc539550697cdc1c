"""benchmarks/e2e_summary.py, the parent side of bench_e2e.py: the learning summary over seeds (the
issue's target: ours' last-10 mean at least TRL's minus one standard error), ratios paired by seed,
and the reward plot."""

from __future__ import annotations

import importlib.util
import math
import statistics

import pytest
from helpers.cli import ROOT


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("e2e_summary", ROOT / "benchmarks" / "e2e_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(provider, seed, rewards, step_s=1.0, peak=1.0):
    steps = [{"step": i + 1, "reward": r, "step_s": step_s, "peak_gib": peak} for i, r in enumerate(rewards)]
    row = {"case": "c", "provider": provider, "seed": seed, "status": "ok", "steps": steps}
    return row | {"reward_per_step": rewards, "steps_per_hour": 3600 / step_s, "peak_gib": peak}


def test_one_seed_takes_the_standard_error_over_the_last_steps(summary):
    ours = [0.0] * 10 + [1.0, 2.0] * 5  # last 10: mean 1.5, stdev sqrt(10/36) ~ 0.527
    trl = [0.0] * 10 + [1.6] * 9 + [2.6]  # last 10: mean 1.7, s.e. 0.1
    out = {x["provider"]: x for x in summary.learning([run("ours", 0, ours), run("trl", 0, trl)])}
    assert out["ours"]["last10"] == pytest.approx(1.5) and out["ours"]["first5"] == 0.0
    assert out["ours"]["se"] == pytest.approx(statistics.stdev(ours[-10:]) / math.sqrt(10))
    assert out["trl"]["se"] == pytest.approx(0.1) and out["trl"]["ours_within_1se"] is False  # 1.5 < 1.7 - 0.1
    assert "ours_within_1se" not in out["ours"] and out["ours"]["seeds"] == 1


def test_several_seeds_take_the_spread_across_seeds(summary):
    rows = [run("ours", s, [0.1] * 5 + [m] * 10) for s, m in enumerate([1.0, 1.2, 1.4])]
    rows += [run("trl", s, [0.2] * 5 + [m] * 10) for s, m in enumerate([1.1, 1.3, 1.5])]
    out = {x["provider"]: x for x in summary.learning(rows)}
    assert out["ours"]["seeds"] == 3 and out["ours"]["last10_per_seed"] == pytest.approx([1.0, 1.2, 1.4])
    assert out["trl"]["last10"] == pytest.approx(1.3) and out["trl"]["se"] == pytest.approx(0.2 / math.sqrt(3))
    assert out["trl"]["ours_within_1se"] is True  # 1.2 >= 1.3 - 0.115
    assert out["ours"]["first5"] == pytest.approx(0.1)
    # a run that crashed (no rewards) is left out, not averaged in
    rows.append({"case": "c", "provider": "trl", "seed": 3, "status": "error: x", "steps": []})
    assert {x["provider"]: x for x in summary.learning(rows)}["trl"]["seeds"] == 3


def test_ratios_pair_rows_of_the_same_seed(summary):
    rows = [run("ours", 0, [1.0], step_s=1.0), run("ours", 1, [1.0], step_s=2.0)]
    rows += [run("trl", 0, [1.0], step_s=4.0, peak=2.0), run("trl", 1, [1.0], step_s=4.0, peak=0.5)]
    summary.add_ratios(rows)
    assert rows[2]["ours_x"] == pytest.approx(4.0) and rows[3]["ours_x"] == pytest.approx(2.0)
    assert rows[2]["target_met"] is True and rows[3]["target_met"] is False  # seed 1: ours uses 2x the memory


def test_plot_draws_every_seed(summary, tmp_path):
    rows = [run(p, s, [0.1 * s + k / 10 for k in range(6)]) for p in ("ours", "trl") for s in range(2)]
    path = tmp_path / "sub" / "reward_vs_trl.png"
    summary.plot_rewards(rows, path, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_merge_relabels_picks_and_summarises_runs_made_apart(tmp_path):
    # e2e_merge.py: seeds run in separate processes (or leases) become one result; a label groups a
    # setting's seeds, a provider filter picks rows out of a file that holds both sides
    import json
    import subprocess
    import sys

    from helpers.cli import cli_env

    def result(name, rows, device="GPU A"):
        payload = {"environment": {"device": device, "date": "d"}, "workload": {"mode": "learn", "steps": 15}}
        path = tmp_path / name
        path.write_text(json.dumps({**payload, "rows": rows}))
        return str(path)

    def curve(m):
        return [0.1] * 5 + [m] * 10

    a = result("a.json", [run("ours", 0, curve(1.0)), run("trl", 0, curve(1.3))])
    b = result("b.json", [run("ours", 1, curve(1.2))], device="GPU B")
    c = result("c.json", [run("ours", 0, curve(0.5))])

    def merge(*specs):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_merge.py"), "--tag", "t", "--out-dir", str(tmp_path)]
        env = cli_env({"PYTHONSAFEPATH": ""})
        return subprocess.run([*cmd, *specs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    proc = merge(a, b, f"{c}=ours, other")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "e2e_learn_t_gpu-a.json").read_text())
    assert [r["provider"] for r in out["rows"]] == ["ours", "trl", "ours", "ours, other"]
    assert [r["source"]["device"] for r in out["rows"]] == ["GPU A", "GPU A", "GPU B", "GPU A"]
    by = {x["provider"]: x for x in out["learning"]}
    assert by["ours"]["seeds"] == 2 and by["ours"]["last10"] == pytest.approx(1.1)
    assert by["ours, other"]["last10"] == pytest.approx(0.5) and by["trl"]["ours_within_1se"] is False
    assert (tmp_path / "e2e_learn_t_gpu-a" / "reward_vs_trl.png").stat().st_size > 0
    proc = merge(f"{a}:trl=trl", f"{b}:trl")  # b holds no trl rows
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {b}:trl: no rows of provider 'trl' in {b}"]
    assert merge(str(tmp_path / "missing.json")).stderr.strip().startswith("error: ")
