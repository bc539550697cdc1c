"""bench_e2e.py runs end to end at smoke sizes on the CPU, so the GPU run has no surprises: the own
trainer's row (and TRL's GRPOTrainer row when trl and datasets are importable) must hold positive,
consistent per-step timings over the right number of steps, and the ratio columns must follow from
the rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers.cli import ROOT, cli_env

HAVE_TRL = all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets", "peft"))
GSM8K = [ROOT / "shared" / "data" / "gsm8k", ROOT.parent / "shared" / "data" / "gsm8k"]  # where the script looks
pytestmark = pytest.mark.skipif(
    not any((d / "train.jsonl").is_file() for d in GSM8K), reason="the shared GSM8K copy (the prompts) is absent"
)


def run_benchmark(*args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), *args]
    env = cli_env({"PYTHONSAFEPATH": ""})  # the script imports its neighbour `common`
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_steps(row: dict, steps: int, max_tokens: int) -> None:
    assert row["status"] == "ok", row["status"]
    assert [s["step"] for s in row["steps"]] == list(range(1, steps + 1)), row["steps"]
    for s in row["steps"]:
        assert s["step_s"] > 0 and s["rollout_s"] > 0 and s["update_s"] > 0, s
        assert abs(s["rollout_s"] + s["update_s"] - s["step_s"]) < 1e-9 * max(1.0, s["step_s"]), s
        assert 0 < s["completion_tokens"] <= max_tokens, s
    # the summary: medians over steps 2..steps (--quick measures from step 2)
    assert row["measured_steps"] == list(range(2, steps + 1))
    assert row["step_s"] > 0 and abs(row["steps_per_hour"] * row["step_s"] - 3600) < 1e-6
    assert row["tokens_per_s"] > 0


@pytest.mark.parametrize("providers", ["ours,trl" if HAVE_TRL else "ours"])
def test_bench_e2e_speed_smoke(tmp_path, providers):
    proc = run_benchmark("--quick", "--steps", "2", "--providers", providers, "--out-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("e2e_speed_*.json")
    payload = json.loads(path.read_text())
    rows = {r["provider"]: r for r in payload["rows"]}
    assert set(rows) == set(providers.split(","))
    assert all(r["case"] == "smollm2-135m/full" for r in rows.values())
    assert payload["workload"]["prompts"] == 2 and payload["workload"]["group"] == 2
    max_tokens = 2 * 2 * 8  # prompts x completions x new tokens
    check_steps(rows["ours"], 2, max_tokens)
    assert "ours_x" not in rows["ours"]
    if "trl" in rows:
        check_steps(rows["trl"], 2, max_tokens)
        ratio = rows["ours"]["steps_per_hour"] / rows["trl"]["steps_per_hour"]
        assert rows["trl"]["ours_x"] == pytest.approx(ratio, rel=1e-9)
        assert rows["trl"]["target_met"] == (ratio >= 3 and rows["trl"].get("ours_mem", 0.0) <= 1.0)
        config = rows["trl"]["grpo_config"]  # our settings, as TRL's fields
        assert config["loss_type"] == "dapo" and config["beta"] == 0.0 and config["num_generations"] == 2
        assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] == 4
        assert config["max_completion_length"] == 8 and config["shuffle_dataset"] is False


def test_bench_e2e_skips_missing_provider(tmp_path):
    """A provider whose package is missing is a "skipped: ..." row; the run still writes its file."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    proc = run_benchmark("--quick", "--providers", "ours-vllm", "--out-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("e2e_speed_*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["provider"] == "ours-vllm" and row["status"] == "skipped: vllm not installed", row


def test_bench_e2e_set_overrides_every_provider(tmp_path):
    """--set comes after the benchmark's own settings (here the smoke sizes) and a bad key is one
    error line before anything runs."""
    proc = run_benchmark(
        "--quick", "--steps", "2", "--providers", "ours", "--set", "sampler.max_new_tokens=3",
        "--out-dir", str(tmp_path), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("e2e_speed_*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["status"] == "ok" and max(s["completion_tokens"] for s in row["steps"]) <= 2 * 2 * 3, row["steps"]
    assert json.loads(path.read_text())["cases"][0]["overrides"][-1] == "sampler.max_new_tokens=3"
    bad = run_benchmark("--quick", "--set", "run.dtyp=float32", "--out-dir", str(tmp_path / "bad"), timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("error: unknown config key 'run.dtyp'"), line
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_bench_e2e_learns_from_a_bf16_checkpoint(tmp_path):
    """--checkpoint-dtype bfloat16 writes SmolLM2 rounded to bf16 (most checkpoints' grid) for every
    provider to load, beside the packaged fp32 one."""
    from safetensors import safe_open

    cache = tmp_path / "models"
    args = ["--mode", "learn", "--quick", "--steps", "2", "--providers", "ours", "--checkpoint-dtype", "bfloat16"]
    proc = run_benchmark(*args, "--model-cache", str(cache), "--out-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(next(tmp_path.glob("e2e_learn_*.json")).read_text())["rows"]
    assert row["status"] == "ok" and len(row["reward_per_step"]) == 2
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert folder.name == "smollm2-135m-bfloat16"
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
