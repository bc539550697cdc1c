"""The rollout benchmarks run end to end at smoke sizes on the CPU, so the GPU run has no surprises:
bench_rollout's long-tail case through the own sampler's compaction and logits processor must
produce exactly the drawn token count, and profile_decode must attribute kernel (here: op) time
to every part of the step."""

from __future__ import annotations

import json
import subprocess
import sys

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
        assert row["ours_tok_s"] > 0 and 0 < row["ours_pct"] < 100, (name, row)
    tail = rows["64x8-longtail"]["ours_detail"]
    assert tail["compactions"] >= 1 and tail["tokens"] < rows["64x8"]["ours_detail"]["tokens"], tail


def test_profile_decode_smoke(tmp_path):
    proc = run_benchmark("profile_decode.py", "--quick", "--cases", "8x8", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("profile_decode_*.json")
    case = json.loads(path.read_text())["cases"]["8x8"]
    assert set(case["by_part_ms"]) == {"layers", "lm head", "sampling"}, case["by_part_ms"]
    assert all(ms > 0 for ms in case["by_part_ms"].values())
    assert abs(sum(v["ms"] for v in case["by_kind"].values()) - case["kernels_ms"]) < 1e-6 * max(1, case["kernels_ms"])
