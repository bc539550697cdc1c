"""The rollout benchmarks run end to end at smoke sizes on the CPU, so the GPU run has no surprises:
bench_rollout's long-tail case through the own sampler's compaction and logits processor must
produce exactly the drawn token count, and profile_decode must attribute kernel (here: op) time
to every part of the step. compare_algorithms trains GRPO, online DPO and PPO through the training
entry point on a tiny model and must record every algorithm's curve, timings, memory and metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers.cli import ROOT, cli_env


def run_benchmark(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    env = cli_env({"PYTHONSAFEPATH": ""})  # a script imports its neighbour `common`
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_rollout_smoke(tmp_path):
    proc = run_benchmark("bench_rollout.py", "--quick", "--providers", "ours", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("rollout_*.json")
    rows = {r["case"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"8x8", "64x8", "64x8-longtail", "long-prompt"}
    for name, row in rows.items():
        detail = row["ours_detail"]
        assert detail["tokens_ok"], (name, detail)
        # the pct is a share of the bound measured in the run; on a loaded CPU (the copy and matmul rates of
        # the moment) it may pass 100, so only its sign is checked here: the GPU runs give the real figure
        assert row["ours_tok_s"] > 0 and row["ours_pct"] > 0, (name, row)
        assert row["ours_pct"] == pytest.approx(100 * row["ours_tok_s"] / row["bound_tok_s"], rel=1e-6), (name, row)
        # G rows sharing a prompt's KV read it once: a lower bound, so a higher share of it
        assert row["shared_decode_bound_s"] < row["decode_bound_s"], (name, row)
        assert row["ours_decode_pct_shared"] < row["ours_decode_pct"], (name, row)
    tail = rows["64x8-longtail"]["ours_detail"]
    assert tail["compactions"] >= 1 and tail["tokens"] < rows["64x8"]["ours_detail"]["tokens"], tail


def test_profile_decode_smoke(tmp_path):
    proc = run_benchmark("profile_decode.py", "--quick", "--cases", "8x8", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("profile_decode_*.json")
    cases = json.loads(path.read_text())["cases"]
    assert set(cases) == {"8x8"}
    case = cases["8x8"]
    assert set(case["by_part_ms"]) == {"layers", "lm head", "sampling"}, case["by_part_ms"]
    assert all(ms > 0 for ms in case["by_part_ms"].values())
    assert 0 < case["shared_bound_ms"] < case["bound_ms"], case
    assert abs(sum(v["ms"] for v in case["by_kind"].values()) - case["kernels_ms"]) < 1e-6 * max(1, case["kernels_ms"])


def test_bench_step_smoke_with_profile(tmp_path):
    """Two quick steps and the profiled update: the phases are timed, the summary is the later run's,
    and the profile's kinds add up to its kernel time (none on the CPU: the wall time is all idle)."""
    proc = run_benchmark("bench_step.py", "--quick", "--runs", "2", "--profile", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("step_*.json")
    result = json.loads(path.read_text())
    assert [r["run"] for r in result["runs"]] == [0, 1]
    assert all(r["rollout_s"] > 0 and r["update_s"] > 0 for r in result["runs"])
    assert result["summary"]["train_tok_s"] > 0
    profile = result["update_profile"]
    assert profile["wall_ms"] > 0
    assert abs(sum(v["ms"] for v in profile["by_kind"].values()) - profile["kernels_ms"]) < 1e-6
    assert abs(profile["gpu_idle_ms"] - (profile["wall_ms"] - profile["kernels_ms"])) < 1e-6


def test_bench_memory_smoke(tmp_path):
    """The quick cases through the update, then a short search for the longest completion that
    fits, whose trials run the sampler probe (a rollout's memory at the longest key length): every
    row of ours and the naive loop runs, and the trials record the rollout's peak."""
    args = ["--quick", "--out-dir", str(tmp_path)]
    proc = run_benchmark("bench_memory.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("memory_quick_*.json")
    result = json.loads(path.read_text())
    ran = [r for r in result["rows"] if r["provider"] in ("ours", "naive")]
    assert len(ran) >= 4 and all(r["status"] == "ok" for r in ran), [(r["case"], r["status"]) for r in ran]
    trials = result["bisect"]["trials"]
    assert trials and all("error" not in str(t.get("status", "")) for t in trials), trials


def test_compare_algorithms_smoke(tmp_path):
    """Three tiny runs of 3 steps (no eval: its processes would double the time), each in its own
    process: every algorithm's reward curve and numbers, the budget kept equal (PPO: 16 prompts x 1
    = GRPO's 2 x 8), dpo.* reaching only online DPO. ~45 s on 2 busy CPU cores."""
    args = ["--quick", "--no-eval", "--out-dir", str(tmp_path), "--set", "dpo.beta=0.2", "run.seed=1"]
    proc = run_benchmark("compare_algorithms.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("algorithms_*.json")
    (png,) = tmp_path.glob("algorithms_*.png")
    assert png.stat().st_size > 10_000, png.stat()
    result = json.loads(path.read_text())
    runs = result["runs"]
    assert list(runs) == ["grpo", "online_dpo", "ppo"] and not result["errors"], result["errors"]
    for name, run in runs.items():
        assert run["error"] is None and run["steps"] == [1, 2, 3], (name, run["error"], run["steps"])
        rewards = run["series"]["reward"]
        assert len(rewards) == 3 and all(-1.0 <= r <= 1.0 for r in rewards), (name, rewards)  # proximity's range
        s = run["summary"]
        assert s["measured_steps"] == [3], s
        phases = s["rollout_s"] + s["logprobs_s"] + s["update_s"] + s["sync_s"]
        assert s["seconds_per_step"] > 0 and abs(s["seconds_per_step"] - phases) < 1e-6, s  # one step: its phases
        assert s["logprobs_update_s"] == s["logprobs_s"] + s["update_s"] > 0, s
        assert 0.05 < s["peak_gib"] < 64, s  # the CPU: the process's peak RSS
        assert run["settings"]["completions_per_step"] == 16 and "run.seed=1" in run["overrides"], run["settings"]
        assert run["settings"]["kl_or_dpo_beta"] == {"grpo": 0.0, "online_dpo": 0.2, "ppo": 0.02}[name]
    assert [runs[a]["settings"]["group_size"] for a in runs] == [8, 8, 1]
    # same seed, weights and prompts: GRPO's and online DPO's first rollouts are the same samples
    assert runs["grpo"]["series"]["reward"][0] == runs["online_dpo"]["series"]["reward"][0]
    dpo, ppo = runs["online_dpo"]["summary"]["final"], runs["ppo"]["summary"]["final"]
    assert dpo["dpo/pairs"] >= 1 and 0.0 <= dpo["dpo/accuracy"] <= 1.0, dpo
    assert math.isfinite(ppo["ppo/explained_variance"]) and ppo["ppo/value_loss"] > 0, ppo
    assert any(
        line.startswith("optimizer_steps_per_step: grpo 1, online_dpo 1, ppo 4") for line in result["differences"]
    )


def test_compare_algorithms_records_failed_runs_and_rejects_bad_configs(tmp_path):
    """A run that fails (here: past --timeout) is its row's error, not the script's; a config mistake
    in one algorithm's run is one `error:` line naming it, before any run starts (no result file)."""
    args = ["--quick", "--no-eval", "--algorithms", "grpo,ppo", "--out-dir", str(tmp_path)]
    proc = run_benchmark("compare_algorithms.py", *args, "--timeout", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("algorithms_*.json")
    result = json.loads(path.read_text())
    assert result["errors"] == {"grpo": "timeout (1 s)", "ppo": "timeout (1 s)"}, result["errors"]
    assert all(run["steps"] == [] and run["summary"] == {} for run in result["runs"].values())
    path.unlink()

    proc = run_benchmark("compare_algorithms.py", *args, "--set", "ppo.epochs=0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: ppo (configs/smollm2_arith_ppo.yaml): invalid config: ppo.epochs must be >= 1, got 0"
    )
    assert "=== algorithm" not in proc.stdout and not list(tmp_path.glob("algorithms_*.json"))


def test_bench_e2e_learn_smoke_over_seeds(tmp_path):
    """bench_e2e's learning mode (synthetic arithmetic, no GSM8K needed): every provider once per
    seed, each row tagged with its seed, the summary over seeds and the plot written."""
    proc = run_benchmark(
        "bench_e2e.py", "--mode", "learn", "--quick", "--seed", "0,1", "--providers", "ours", "--out-dir", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("e2e_learn_*.json")
    payload = json.loads(path.read_text())
    assert [(r["provider"], r["seed"], r["status"]) for r in payload["rows"]] == [("ours", 0, "ok"), ("ours", 1, "ok")]
    for row in payload["rows"]:
        assert len(row["reward_per_step"]) == 3 and all(0 <= r <= 2 for r in row["reward_per_step"]), row
    (summary,) = payload["learning"]
    assert summary["provider"] == "ours" and summary["seeds"] == 2 and len(summary["last10_per_seed"]) == 2
    assert (tmp_path / path.stem / "reward_vs_trl.png").stat().st_size > 10_000


def import_benchmark(name: str):
    """A benchmark script as a module (its folder first on sys.path: it imports its neighbour `common`)."""
    import importlib

    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (as strict JSON readers do)."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_write_result_writes_strict_json(tmp_path):
    """A failed reward's NaN mean or a ratio over a zero time is written as null, at any depth."""
    common = import_benchmark("common")
    payload = {
        "environment": {"device": "cpu (test)"},
        "rows": [{"reward": math.nan, "ratio": math.inf, "ok": 1.5}, {"curve": (0.5, -math.inf, 2)}],
        "summary": {"mean": float("nan"), "n": 3, "name": "x"},
    }
    path = common.write_result("strict", payload, out_dir=tmp_path)
    assert path == tmp_path / "strict_cpu-test.json"
    result = strict_json(path.read_text())
    assert result["rows"] == [{"reward": None, "ratio": None, "ok": 1.5}, {"curve": [0.5, None, 2]}]
    assert result["summary"] == {"mean": None, "n": 3, "name": "x"}


def test_trl_schedule_is_the_trainers_with_several_updates_per_step():
    """TRL is handed our schedule: with grpo.num_iterations = 2 the warmup lasts 2 x warmup_steps
    optimizer steps, as the trainer's scheduler (build.py) makes it, not warmup_steps."""
    import torch

    from minigrpo.algorithms import updates_per_step
    from minigrpo.config import load_config
    from minigrpo.optim import build_scheduler

    bench_e2e = import_benchmark("bench_e2e")
    overrides = ["grpo.num_iterations=2", "train.warmup_steps=2", "train.steps=3", "train.schedule=linear"]
    cfg = load_config(None, [*overrides, "train.lr=1.0"])
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = bench_e2e.trl_optimizers(model, cfg)
    ours_opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    ups = updates_per_step(cfg)
    ours = build_scheduler(ours_opt, cfg.train, cfg.train.steps * ups, ups)
    trl_lrs, our_lrs = [], []
    for _ in range(cfg.train.steps * ups):
        trl_lrs.append(optimizer.param_groups[0]["lr"])
        our_lrs.append(ours_opt.param_groups[0]["lr"])
        for opt, sched in ((optimizer, scheduler), (ours_opt, ours)):
            opt.step()
            sched.step()
    assert our_lrs[:4] == [0.25, 0.5, 0.75, 1.0], our_lrs
    assert trl_lrs == our_lrs, (trl_lrs, our_lrs)


def test_bench_load_writes_to_out_dir(tmp_path):
    """A tiny architecture through ours and the naive loader: the result goes to --out-dir (never into
    benchmarks/results), strict JSON with the environment and a positive time and peak per row; the
    GGUF row only when --loaders names gguf (the random checkpoints are no GGUF files)."""
    args = ["--archs", "tiny-llama", "--loaders", "ours,naive", "--out-dir", str(tmp_path)]
    proc = run_benchmark("bench_load.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("load_*.json")
    result = strict_json(path.read_text())
    env = result["environment"]
    assert env["device"] and env["torch"] and env["python"] and "triton" in env, env
    assert [(r["checkpoint"], r["loader"]) for r in result["rows"]] == [("tiny-llama", "ours"), ("tiny-llama", "naive")]
    for row in result["rows"]:
        assert row["size_gb"] > 0 and row["seconds"] > 0 and row["peak_x_size"] >= 0, row
        assert abs(row["peak_rise_gb"] / row["size_gb"] - row["peak_x_size"]) < 1e-9, row
