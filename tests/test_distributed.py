"""Data-parallel training under torchrun with two gloo processes on the CPU: the parameters after k
steps equal those of one process on the same global batch, checkpoints resume on another number of
ranks, and only rank 0 writes. The launches go through the real entry point
(`python -m torch.distributed.run --nproc_per_node 2 -m minigrpo.train`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import cli_env
from helpers.runs import TIMING, run_config
from safetensors.torch import load_file

from minigrpo.build import validate_distributed
from minigrpo.config import Config, ConfigError
from minigrpo.distributed import World, all_reduce_gradients, clip_grad_norm, full_weights, shard_range

TOL = 1e-5  # max |parameter difference| between 1 and 2 processes (fp32; only summation order differs)


def base_config(tmp_path: Path, name: str, device: str = "cpu", **sections) -> dict:
    """test_train's copy task, 3 steps of 4 prompts x 4 completions of up to 3 tokens, then `sections`."""
    cfg = run_config(
        tmp_path,
        run={"name": name, "device": device, "dtype": "float32"},
        sampler={"max_new_tokens": 3},
        grpo={"prompts_per_step": 4, "group_size": 4},
        train={"steps": 3, "lr": 0.01, "micro_batch_size": 4},
        log={"sample_every": 1},
        checkpoint={"save_final": True},
    )
    for section, values in sections.items():  # a dict updates its section, a list (rewards) replaces it
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def launch(tmp_path: Path, cfg: dict, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """Train `cfg` in one process, or in `nproc` ranks under torchrun; the finished process, failed or not."""
    path = tmp_path / f"{cfg['run']['name']}-{nproc}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "minigrpo.train", "--config", str(path), *extra]
    env = cli_env({"OMP_NUM_THREADS": "1"})
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def run(tmp_path: Path, cfg: dict, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """`launch`, raising with the output on failure."""
    done = launch(tmp_path, cfg, nproc, *extra)
    assert done.returncode == 0, f"{' '.join(done.args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def final_weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the run's newest checkpoint (model or PEFT adapter files)."""
    ckpts = sorted((tmp_path / "runs" / name / "checkpoints").glob("step_*"))
    tensors = {}
    for f in sorted(ckpts[-1].glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no weights in {ckpts[-1]}"
    return tensors


def metrics(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict | None = None) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= TOL, f"max |1 process - 2 processes| = {worst:.3g} > {TOL}"
    if start is not None:  # the comparison means something only if training moved the weights
        # (adapters start from B = 0: any non-zero B moved)
        moving = [k for k in a if k in start or "lora_B" in k]
        moved = max((a[k].float() - start.get(k, torch.zeros_like(a[k])).float()).abs().max().item() for k in moving)
        assert moved > 100 * TOL, f"training barely changed the weights ({moved:.3g})"


CASES = {
    # full fine-tuning sharded with FSDP2; 3 prompts on 2 ranks (1 + 2 groups, so ranks make unequal
    # numbers of passes), dynamic sampling, two iterations per batch (old log-probs), a KL term
    # (a sharded frozen reference), "batch" reward scaling (a global std), the dapo normaliser, and
    # block checkpointing (recomputed blocks gather their shards again)
    "fsdp": {
        "model": {"gradient_checkpointing": True},
        "grpo": {
            "prompts_per_step": 3,
            "dynamic_sampling": True,
            "max_resample_rounds": 2,
            "num_iterations": 2,
            "beta": 0.05,
            "scale_rewards": "batch",
        },
    },
    # replicated full fine-tuning with one gradient all-reduce; the grpo (per-sequence) normaliser
    "ddp": {"distributed": {"strategy": "ddp"}, "grpo": {"loss_type": "grpo"}, "train": {"micro_batch_size": 2}},
    # LoRA (auto: replicated adapters), dr_grpo normaliser, the reference = adapters switched off
    "lora": {
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "grpo": {"loss_type": "dr_grpo", "beta": 0.05},
        "train": {"lr": 0.05},
    },
    # LoRA where a rank trains on nothing: only odd answers have a reward spread, so dynamic sampling
    # drops every even group (step 2 of seed 0 keeps one group of 2 prompts: one rank holds no row and
    # makes no backward); 2-row micro-batches (gradient accumulation) and a clipped global norm
    # (max_grad_norm 0.01 is far below every step's norm). Adam's eps 1e-5: see test_ppo_distributed
    "lora-rank-without-rows": {
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "grpo": {"prompts_per_step": 2, "dynamic_sampling": True, "max_resample_rounds": 2, "loss_type": "grpo"},
        "train": {"lr": 0.05, "micro_batch_size": 2, "max_grad_norm": 0.01, "eps": 1e-5},
        "rewards": [{"name": "test_distributed:odd_answer_length"}],
    },
}


def odd_answer_length(prompts: list, completions: list[str], answers: list, **_) -> list[float]:
    """A reward with a spread only where the answer is odd (len(completion) / 10); 0 for even answers,
    whose groups dynamic sampling then always drops (the ranks get unequal shares, even none)."""
    return [len(c) / 10 if int(a) % 2 else 0.0 for c, a in zip(completions, answers)]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, TWO_GPUS])]  # gloo on the CPU, NCCL on GPUs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_train_exactly_like_one_process(tmp_path, case, device):
    """fp32 on both devices: one process and two ranks then differ only in summation order."""
    assert_two_ranks_train_like_one_process(tmp_path, case, CASES[case], device)


def assert_two_ranks_train_like_one_process(tmp_path: Path, case: str, sections: dict, device: str = "cpu") -> None:
    """Train `sections` in one process and in two ranks: the final weights agree within TOL and every
    logged metric (timings aside) of every step within 1e-4 relative; only rank 0 prints the table."""
    one = base_config(tmp_path, f"{case}-1", device, **sections)
    two = base_config(tmp_path, f"{case}-2", device, **sections)
    run(tmp_path, one, 1)
    out = run(tmp_path, two, 2)
    start = load_file(tmp_path / "model" / "model.safetensors")
    assert_same_weights(final_weights(tmp_path, f"{case}-1"), final_weights(tmp_path, f"{case}-2"), start)

    # rank 0 alone logs: one line per step, and the metrics describe the whole global batch
    m1, m2 = metrics(tmp_path, f"{case}-1"), metrics(tmp_path, f"{case}-2")
    assert [r["step"] for r in m2] == [1, 2, 3]
    for r1, r2 in zip(m1, m2):
        for key, v1 in r1.items():
            if key.startswith(TIMING) or key == "step":
                continue
            assert r2[key] == pytest.approx(v1, rel=1e-4, abs=1e-5), f"step {r1['step']}: {key}"
    assert out.stdout.count("  step  reward") == 1, "the table header was printed by more than one rank"


def test_bnpo_on_two_ranks_trains_like_one_process(tmp_path):
    """bnpo averages per-micro-batch token means over the step's micro-batches. 3 prompts x 4 on two
    ranks give them 4 and 8 rows, so their 2-row micro-batches are exactly one process's 6: the
    gradient must be the same (one process: each over 6; measured before the fix: each rank over its
    own 2 or 4, then averaged over the ranks: weights 0.058 apart after 3 steps; with max_grad_norm
    0.01 the loss of step 1 is -0.0884 instead of -0.0649)."""
    sections = {
        "grpo": {"prompts_per_step": 3, "loss_type": "bnpo"},
        "train": {"micro_batch_size": 2, "eps": 1e-5},
        "rewards": [{"name": "helpers.reward_fns:length_ratio"}],  # a spread in every group: a gradient at once
    }
    assert_two_ranks_train_like_one_process(tmp_path, "bnpo", sections)


def test_a_config_that_cannot_be_split_fails_with_one_line(tmp_path):
    """1 prompt per step on 2 ranks: one `error:` line naming the setting, before any weights load."""
    cfg = base_config(tmp_path, "unsplittable", grpo={"prompts_per_step": 1})
    done = launch(tmp_path, cfg, 2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0
    assert not (tmp_path / "runs" / "unsplittable").exists(), "the run started before the check"
    assert errors and all("grpo.prompts_per_step (1)" in line for line in errors), done.stderr[-3000:]
    assert len(errors) == 1, f"the error was printed {len(errors)} times:\n" + "\n".join(errors)


def test_checkpoints_resume_on_another_number_of_ranks(tmp_path):
    """2 steps on two ranks, then steps 3-4 in one process (and 1 -> 2, and 2 -> 2): the weights
    equal those of 4 uninterrupted steps in one process."""
    sections = {"train": {"steps": 4}, "checkpoint": {"every": 2, "save_final": True, "keep_last": 3}}
    straight = base_config(tmp_path, "straight", **sections)
    run(tmp_path, straight, 1)
    reference = final_weights(tmp_path, "straight")
    for first, then in ((2, 1), (1, 2), (2, 2)):
        name = f"from{first}to{then}"
        cfg = base_config(tmp_path, name, **sections)
        run(tmp_path, cfg, first, "--set", "train.steps=2")
        run(tmp_path, cfg, then, "--resume")
        assert [r["step"] for r in metrics(tmp_path, name)] == [1, 2, 3, 4]
        assert_same_weights(reference, final_weights(tmp_path, name))


# ------------------------------------------------------------------------------------------------
# pieces that need no second process


@pytest.mark.parametrize("n,size", [(3, 2), (8, 2), (7, 4), (2, 3)])
def test_shard_range_splits_every_item_to_exactly_one_rank(n, size):
    shares = [shard_range(n, r, size) for r in range(size)]
    covered = [i for lo, hi in shares for i in range(lo, hi)]
    assert covered == list(range(n))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


def test_a_single_process_world_makes_no_collective_calls():
    world = World()
    assert world.main and not world.distributed
    assert world.all_gather({"a": 1}) == [{"a": 1}]
    assert world.max_int(5) == 5
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_gradients([p], world)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    model = torch.nn.Linear(2, 2)
    with full_weights(model) as net:  # not sharded: the model itself
        assert net is model


def test_clip_grad_norm_measures_and_clips_the_global_norm():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm([a, b], float("inf")) == pytest.approx(1.0, rel=1e-5)  # measure only


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_grad_norm_reports_a_non_finite_norm_and_leaves_the_gradients(bad):
    """A NaN or inf gradient: the norm says so (the update is then skipped, grad_scale.optimizer_step)
    and no gradient is touched (torch's clip_grad_norm_ would make them all NaN or zero)."""
    ours = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    for p in ours:
        p.grad = torch.arange(1.0, p.numel() + 1)
    ours[0].grad[0] = bad
    before = [p.grad.clone() for p in ours]
    norm = clip_grad_norm(ours, 1.0)
    assert norm != norm if bad != bad else norm == float("inf")
    for p, b in zip(ours, before):
        torch.testing.assert_close(p.grad, b, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"grpo": {"prompts_per_step": 1}}, "grpo.prompts_per_step (1)"),
        ({"run": {"device": "cuda:1"}}, "run.device='cuda:1'"),
        ({"lora": {"enabled": True}, "distributed": {"strategy": "fsdp"}}, "lora.enabled"),
        ({"train": {"optimizer": "adamw8bit"}}, "train.optimizer='adamw8bit'"),
    ],
)
def test_distributed_settings_are_checked_before_any_work(overrides, needle):
    cfg = Config.from_dict(overrides)
    validate_distributed(cfg, 1)  # one process: nothing to check
    with pytest.raises(ConfigError, match="distributed") as err:
        validate_distributed(cfg, 2)
    assert needle in str(err.value)


def test_vllm_runs_under_torchrun():
    validate_distributed(Config.from_dict({"sampler": {"kind": "vllm"}}), 2)  # each rank its own engine
