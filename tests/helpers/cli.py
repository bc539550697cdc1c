"""Running the real entry points in a subprocess, on the tree under test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with the repository root and tests/ (for `helpers.*` rewards) put first on
    PYTHONPATH, keeping what was there: the child imports this tree, not an installed copy."""
    path = os.pathsep.join(p for p in (str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", **(extra or {})}


def run_module(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    """`python -m module args...` -> CompletedProcess (text output captured)."""
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def train_cli(tmp_path: Path, cfg: dict, *extra: str, env: dict[str, str] | None = None):
    """`python -m minigrpo.train --config <cfg written as YAML> extra...`."""
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_module("minigrpo.train", "--config", str(path), *extra, cwd=tmp_path, env=env)


def one_error_line(proc) -> str:
    """The single `error: ...` line of a failed CLI run (exit status 2, no traceback); the message."""
    assert proc.returncode == 2, f"exit status {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0].removeprefix("error: ")


def ranks_result(script: Path, out: Path, nproc: int = 2):
    """Run `script` (a test file whose __main__ is a rank's work) as `nproc` gloo ranks under torchrun,
    passing `out` as its argument, and load what rank 0 saved there."""
    import torch

    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, str(Path(script).resolve()), str(out)]
    done = subprocess.run(cmd, env=cli_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the ranks failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return torch.load(out)
