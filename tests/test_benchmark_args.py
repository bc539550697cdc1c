"""The benchmark scripts' arguments: a bad value is one `error:` line naming the flag (exit status 2,
no traceback, no usage dump), before anything is built or measured. Each case runs the script."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.cli import ROOT, cli_env, one_error_line


def run_script(script: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    env = cli_env({"PYTHONSAFEPATH": ""})  # a script imports its neighbour `common`
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


A_FILE = str(ROOT / "README.md")


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("bench_e2e.py", ("--steps", "-1"), "bench_e2e.py: argument --steps: must be >= 1, got -1"),
        ("bench_e2e.py", ("--micro", "x"), "bench_e2e.py: argument --micro: expected an integer >= 1, got 'x'"),
        ("bench_e2e.py", ("--mode", "fast"), "bench_e2e.py: argument --mode: invalid choice: 'fast'"),
        ("bench_e2e.py", ("--providers", "ours,xx"), "argument --providers: a comma-separated list of ours,"),
        ("bench_e2e.py", ("--cases", "foo/bar"), "--cases: 'foo/bar' is not <model>/full or <model>/lora"),
        ("bench_e2e.py", ("--out-dir", f"{A_FILE}/x"), f"argument --out-dir: {A_FILE}/x: {A_FILE} is a file"),
        ("bench_load.py", ("--loaders", "nope"), "argument --loaders: a comma-separated list of ours, gguf, naive"),
        ("bench_memory.py", ("--cases", "nope"), "argument --cases: a comma-separated list of qwen-lora-1k"),
        ("bench_memory.py", ("--quick", "--cases", "qwen-lora-1k"), "--cases: qwen-lora-1k: not a --quick case"),
        ("bench_memory.py", ("--providers", "ours,ours"), "argument --providers: a comma-separated list of"),
        ("bench_memory.py", ("--memory-gib", "-5"), "argument --memory-gib: must be a finite number > 0, got -5"),
        ("bench_scaling.py", ("--gpus", "1,x"), "bench_scaling.py: argument --gpus: expected an integer >= 1, got 'x'"),
        ("bench_scaling.py", ("--steps", "0"), "bench_scaling.py: argument --steps: must be >= 1, got 0"),
        ("bench_step.py", ("--prompts", "0"), "bench_step.py: argument --prompts: must be >= 1, got 0"),
        ("bench_sync.py", ("--dtype", "float64x"), "bench_sync.py: argument --dtype: invalid choice: 'float64x'"),
        ("bench_sync.py", ("--gpu-memory-utilization", "5"), "argument --gpu-memory-utilization: must be in (0, 1]"),
        ("bench_sync.py", ("--reps", "0"), "bench_sync.py: argument --reps: must be >= 1, got 0"),
        ("compare_algorithms.py", ("--timeout", "-1"), "argument --timeout: must be a finite number > 0, got -1"),
        ("compare_samplers.py", ("--gpu-memory-utilization", "7"), "argument --gpu-memory-utilization: must be in"),
        ("compare_samplers.py", ("--out-dir", A_FILE), f"argument --out-dir: {A_FILE}: {A_FILE} is a file"),
        ("compare_samplers.py", ("--is-correction", "tok"), "argument --is-correction: invalid choice: 'tok'"),
        ("compare_samplers.py", ("--steps", "0"), "compare_samplers.py: argument --steps: must be >= 1, got 0"),
        ("bench_kernels.py", ("--cases", "rmsnorm,rms"), "argument --cases: a comma-separated list of rmsnorm, rope"),
        ("bench_load.py", ("--archs", "qwen9"), "argument --archs: a comma-separated list of llama-3.1-8b,"),
        ("bench_load.py", ("--out-dir", f"{A_FILE}/x"), f"argument --out-dir: {A_FILE}/x: {A_FILE} is a file"),
        ("bench_e2e.py", ("--cases", "qwen9/full"), "--cases: 'qwen9/full': unknown model 'qwen9'; known: llama-3.1"),
    ],
)
def test_a_bad_argument_is_one_line(script, args, expected):
    assert expected in one_error_line(run_script(script, *args))


def test_bench_kernels_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert one_error_line(run_script("bench_kernels.py", "--quick")) == (
        "bench_kernels.py measures Triton kernels on a CUDA GPU, and this machine has none"
    )


def test_tool_sft_data_needs_a_file_to_write(tmp_path):
    config = str(ROOT / "configs" / "smollm2_arith_tools.yaml")
    message = one_error_line(run_script("tool_sft_data.py", "--config", config, "--out", str(tmp_path)))
    assert message == f"--out {tmp_path} is a folder; name the JSONL file, e.g. {tmp_path / 'tool_sft.jsonl'}"
    assert not list(tmp_path.iterdir())


def test_compare_samplers_without_a_gpu_says_so_before_any_run(tmp_path):
    """The GPU config on a machine without CUDA: one line naming the run and the fix, no result file."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = ROOT / "configs" / "smollm2_arith_gpu.yaml"
    message = one_error_line(run_script("compare_samplers.py", "--out-dir", str(tmp_path)))
    assert message == (
        f"sampler.kind=own ({config}): run.device='cuda' but CUDA is not available on this machine (use run.device=cpu)"
    )
    assert not list(tmp_path.iterdir())
