"""benchmarks/e2e_parity.py: one GRPO update of ours and of TRL's GRPOTrainer on the same batch, in
fp32 on the CPU, must be the same update (runs where trl, datasets and peft are importable)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers.cli import ROOT, cli_env

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("trl", "datasets", "peft", "transformers")),
    reason="TRL (a benchmark-only reference) is not installed",
)


def test_one_update_equals_trls(tmp_path):
    # both embeddings take padding_idx = pad_token_id (<|im_end|> for SmolLM2), whose row then gets no
    # gradient from its lookups: kept as transformers builds it, every parameter must agree
    cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_parity.py"), "--quick", "--ties", "tied,untied"]
    cmd += ["--hf-padding-idx", "keep", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env({"PYTHONSAFEPATH": ""}), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("e2e_parity_*.json")
    cases = json.loads(path.read_text())["cases"]
    assert [c["tied"] for c in cases] == [True, False]
    for c in cases:
        assert c["prompt_ids_equal"] and c["advantage_max_diff"] < 1e-6, c
        assert c["logp_max_diff"] < 1e-5 and c["loss_rel_diff"] < 1e-5, c
        assert abs(c["grad_norm_ratio"] - 1) < 1e-5, c
        assert c["grads"]["cos"] > 1 - 1e-9 and c["grads"]["rel_diff"] < 1e-5, c["grads"]
        # Adam's first step is ~ lr * g / (|g| + eps): fp32 noise in the tiniest gradients shows up
        assert c["updates"]["cos"] > 0.9999 and c["updates"]["rel_diff"] < 1e-3, c["updates"]
