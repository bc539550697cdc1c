"""PPO under torchrun: two gloo ranks on the CPU train exactly like one process.

Each case trains 2 steps of 6 prompts x 1 completion (up to 3 tokens, rewards of several values)
with 2 epochs and a KL penalty, once in this process and once under
`python -m torch.distributed.run --nproc_per_node 2 -m minigrpo.train`. The policy and the critic
after the last step (from the checkpoint: model or adapter files, and the critic in the trainer
state) must agree within 1e-5, and every logged metric (ppo/* included) within 1e-4 relative: the
whitening, the token normalisers and the metrics are those of the whole batch, and the shuffled
mini-batches are the same global ones whatever the split. 6 rows on 2 ranks in mini-batches of 3
give the ranks unequal shares of a mini-batch (even none), so FSDP's idle passes run too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import cli_env
from helpers.runs import TIMING, run_config
from safetensors.torch import load_file

from minigrpo.checkpoint import load_trainer_state
from minigrpo.train import main

TOL = 1e-5  # max |weight difference| of policy and critic, 1 process vs 2 ranks (fp32, summation order)

LORA = {"lora": {"enabled": True, "r": 4, "alpha": 8}}
CASES = {
    # full fine-tuning: the policy sharded with FSDP2 (the default), the separate critic replicated
    "separate-fsdp-mb2": ({}, {"value_model": "separate", "mini_batches": 2}),
    # full fine-tuning replicated (one all-reduce per optimizer step for each model), one mini-batch
    "separate-ddp-mb1": ({"distributed": {"strategy": "ddp"}}, {"value_model": "separate", "mini_batches": 1}),
    # LoRA: replicated adapters of both the policy and the critic; the two-rank run stops after
    # step 1 and resumes, so every rank must load the critic rank 0 wrote
    "lora-mb2-resumed": (LORA, {"value_model": "lora", "mini_batches": 2}),
    "lora-mb1": (LORA, {"value_model": "lora", "mini_batches": 1}),
}


def ppo_config(tmp_path: Path, name: str, sections: dict, ppo: dict) -> dict:
    cfg = run_config(
        tmp_path,
        algorithm="ppo",
        run={"name": name, "dtype": "float32"},
        sampler={"max_new_tokens": 3},
        grpo={"prompts_per_step": 6, "group_size": 1},
        # Adam divides by sqrt(v) + eps: a gradient component near 0 (a cancellation) turns a rounding
        # difference dg into an update difference near lr * dg / eps; eps 1e-5 keeps that far below TOL
        train={"steps": 2, "lr": 0.003, "micro_batch_size": 2, "eps": 1e-5},
        ppo={"epochs": 2, "kl_coef": 0.05, "vf_coef": 0.5, "value_lr": 0.003, **ppo},
        checkpoint={"every": 1, "keep_last": 3, "save_final": True},
        rewards=[{"name": "helpers.reward_fns:length_ratio"}],  # words of several lengths: a spread at once
    )
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def one_process(tmp_path: Path, cfg: dict) -> None:
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same summation order in each matmul
    try:
        main(["--config", str(path)])
    finally:
        torch.set_num_threads(threads)


def two_ranks(tmp_path: Path, cfg: dict, *extra: str) -> None:
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, "-m", "minigrpo.train", "--config", str(path), *extra]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=cli_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}"


def final_state(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    """The last checkpoint's policy tensors ("policy.*") and critic weights ("critic.*")."""
    ckpt = tmp_path / "runs" / name / "checkpoints" / "step_000002"
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"policy.{k}": v for k, v in load_file(f).items()})
    critic = load_trainer_state(ckpt)["critic"]["weights"]
    out.update({f"critic.{k}": v for k, v in critic.items()})
    assert any(k.startswith("policy.") for k in out) and "critic.head.weight" in out
    return out


def metrics(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_policy_and_critic_like_one_process(tmp_path, case):
    sections, ppo = CASES[case]
    one = ppo_config(tmp_path, "one", sections, ppo)
    two = ppo_config(tmp_path, "two", sections, ppo)
    one_process(tmp_path, one)
    if case.endswith("resumed"):
        two_ranks(tmp_path, two, "--set", "train.steps=1")
        two_ranks(tmp_path, two, "--resume")
    else:
        two_ranks(tmp_path, two)

    a, b = final_state(tmp_path, "one"), final_state(tmp_path, "two")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= TOL, f"max |1 process - 2 ranks| = {worst:.3g} > {TOL}"
    # the comparison means something only if both models moved: the critic's head starts at zero,
    # LoRA B matrices start at zero, a full policy from the initial checkpoint
    start = {f"policy.{k}": v for k, v in load_file(tmp_path / "model" / "model.safetensors").items()}
    for prefix in ("policy.", "critic."):
        moved = max(
            float((a[k] - start.get(k, torch.zeros_like(a[k]))).abs().max())
            for k in a
            if k.startswith(prefix) and (k in start or "lora_B" in k or k == "critic.head.weight")
        )
        assert moved > 100 * TOL, f"training barely moved the {prefix[:-1]} ({moved:.3g})"

    m1, m2 = metrics(tmp_path, "one"), metrics(tmp_path, "two")
    assert [r["step"] for r in m2] == [1, 2]
    assert any(k.startswith("ppo/") for k in m1[0])
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1.keys() == r2.keys()
        for key, v1 in r1.items():
            if key.startswith(TIMING) or key == "step":
                continue
            assert r2[key] == pytest.approx(v1, rel=1e-4, abs=1e-5, nan_ok=True), f"step {r1['step']}: {key}"
    assert math.isfinite(m1[-1]["ppo/explained_variance"]) and m1[-1]["ppo/clip_frac"] > 0


def test_batch_moments_of_one_process_are_the_masked_ones():
    """batch_moments with a single-process World: ppo_math.masked_mean_var of each tensor (1e-6), and
    whiten() with those moments equals whiten() computing its own; no active token gives (0, 0)."""
    from minigrpo.algorithms.ppo import batch_moments
    from minigrpo.algorithms.ppo_math import masked_mean_var, whiten
    from minigrpo.distributed import World

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g) * 3 + 1, torch.randn(6, 5, generator=g)  # (N, Tc) each
    mask = (torch.rand(6, 5, generator=g) > 0.4).float()
    moments = batch_moments(World(), {"x": x, "y": y}, mask)
    for name, t in (("x", x), ("y", y)):
        mean, var = masked_mean_var(t, mask)
        assert moments[name] == pytest.approx((float(mean), float(var)), rel=1e-6)
    assert torch.allclose(whiten(x, mask, moments=moments["x"]), whiten(x, mask), atol=1e-6)
    assert batch_moments(World(), {"x": x}, torch.zeros_like(mask)) == {"x": (0.0, 0.0)}
