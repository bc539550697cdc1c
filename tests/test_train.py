"""The training loop end to end, through the CLI entry point, on tiny random models (CPU)."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import yaml
from helpers.cli import train_cli
from helpers.runs import TIMING, run_config

from minigrpo.models.loading import load_pretrained
from minigrpo.train import main


def launch(tmp_path, cfg: dict, *extra: str) -> list[dict]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["--config", str(path), *extra])
    run_dir = tmp_path / "runs" / cfg["run"]["name"]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_a_one_token_task(tmp_path):
    records = launch(tmp_path, run_config(tmp_path, checkpoint={"every": 0, "save_final": True}))
    rewards = [r["reward"] for r in records]
    assert len(rewards) == 80
    assert rewards[0] <= 0.2, f"the untrained policy should be near chance: {rewards[:5]}"
    assert sum(rewards[-10:]) / 10 >= 0.9, f"the policy did not learn: {[round(r, 2) for r in rewards]}"
    assert (tmp_path / "runs" / "run" / "config.yaml").is_file()

    # the eval CLI reads the run's config.yaml next to the checkpoint and scores greedy answers
    from minigrpo.eval import main as evaluate

    before = evaluate(
        [
            "--checkpoint",
            str(tmp_path / "model"),
            "--config",
            str(tmp_path / "config.yaml"),
            "--split",
            "train",
            "--num",
            "50",
        ]
    )
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "step_000080"
    out = tmp_path / "eval.json"
    after = evaluate(["--checkpoint", str(ckpt), "--split", "train", "--num", "50", "--output", str(out)])
    assert before["accuracy"] <= 0.3 and after["accuracy"] >= 0.95, (before["accuracy"], after["accuracy"])
    assert json.loads(out.read_text())["num_examples"] == 50


def checkpoint_tensors(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint folder holds (model or PEFT adapter files)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no weights in {ckpt}"
    return tensors


@pytest.mark.parametrize(
    "variant",
    [
        {},
        # LoRA dropout draws from the torch RNG in every update: equal weights need the RNG restored
        {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.3}},
        # bf16 weights, fp32 masters and fp32 norm gains: the fp32 values come back from the optimizer state
        {"run": {"dtype": "bfloat16"}},
    ],
    ids=["full", "lora_dropout", "bf16"],
)
def test_killed_run_resumes_to_identical_parameters_and_metrics(tmp_path, variant):
    """SIGKILL in the middle of step 5 (inside the reward phase), resume from the step-4 checkpoint:
    the final weights (bitwise) and every non-timing metric equal those of an uninterrupted run."""
    base = run_config(
        tmp_path,
        rewards=[{"name": "helpers.killer:reward"}],
        # a schedule that moves at every step (the resumed LR must follow it), 4 accumulated micro-batches
        train={"steps": 6, "lr": 0.003, "warmup_steps": 2, "schedule": "cosine", "micro_batch_size": 32},
        checkpoint={"every": 2, "keep_last": 5, "save_final": True},
        **variant,
    )
    straight = {**base, "run": {**base["run"], "name": "straight"}}
    crashed = {**base, "run": {**base["run"], "name": "crashed"}}
    assert train_cli(tmp_path, straight).returncode == 0
    killed = train_cli(tmp_path, crashed, env={"KILL_ON_CALL": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in (runs / "crashed" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    resumed = train_cli(tmp_path, crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    final = runs / "straight" / "checkpoints" / "step_000006"
    assert yaml.safe_load((final / "run_config.yaml").read_text())["train"]["steps"] == 6
    assert not list((runs / "crashed" / "checkpoints").glob(".tmp-*")), "a temporary checkpoint was left behind"
    a = checkpoint_tensors(final)
    b = checkpoint_tensors(runs / "crashed" / "checkpoints" / "step_000006")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume: {(a[name] - b[name]).abs().max():.2e}"
    first = checkpoint_tensors(runs / "crashed" / "checkpoints" / "step_000002")
    assert any(not torch.equal(first[k], a[k]) for k in a), "the weights did not change after step 2"

    def records(name):
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(TIMING)} for x in lines]

    assert [r["step"] for r in records("crashed")] == [1, 2, 3, 4, 5, 6]
    assert records("crashed") == records("straight")


def test_loop_options_dynamic_sampling_iterations_kl(tmp_path):
    """Dynamic sampling refills zero-spread groups; num_iterations=2 uses stored old log-probs (the
    ratio leaves 1 on the second pass); beta > 0 trains against a frozen reference copy."""
    cfg = run_config(
        tmp_path,
        grpo={
            "prompts_per_step": 8,
            "group_size": 4,
            "dynamic_sampling": True,
            "max_resample_rounds": 2,
            "num_iterations": 2,
            "beta": 0.1,
            "loss_type": "grpo",
        },
        train={"steps": 6, "lr": 0.01, "micro_batch_size": 8},
    )
    records = launch(tmp_path, cfg)
    assert len(records) == 6
    assert any(r["sampling_rounds"] > 1 for r in records), "dynamic sampling never refilled"
    for r in records:
        if r["sampling_rounds"] < 3:  # rounds left over: every kept group has a reward spread
            assert r["kept/frac_zero_spread"] == 0.0, r
        assert r["kept/groups"] <= 8 and r["frac_zero_spread"] >= r["kept/frac_zero_spread"], r
        assert math.isfinite(r["kl"]) and r["ratio_min"] <= 1.0 <= r["ratio_max"]
    assert max(r["kl"] for r in records) > 0.0  # the policy moved away from the reference
    assert any(r["ratio_max"] > 1.0 or r["ratio_min"] < 1.0 for r in records)  # second pass is off-policy


def test_rollout_in_waves_trains_exactly_as_in_one_batch(tmp_path):
    """sampler.max_rows decodes a step's rows in waves: the same tokens, so the same run."""
    base = {"train": {"steps": 4, "micro_batch_size": 16}, "grpo": {"prompts_per_step": 4, "group_size": 8}}
    one = launch(tmp_path, run_config(tmp_path, run={"name": "one"}, **base))
    waves = launch(tmp_path, run_config(tmp_path, run={"name": "waves"}, sampler={"max_rows": 5}, **base))
    for a, b in zip(one, waves, strict=True):
        for key in ("reward", "reward_std", "loss", "grad_norm", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_lora_run_trains_adapters_only_and_resumes(tmp_path):
    """LoRA through the CLI: the base stays bitwise frozen, the reference for beta > 0 is the same
    model with adapters off (no copy), checkpoints hold a PEFT adapter, a resumed run continues it,
    and the merged export loads as a plain checkpoint."""
    from minigrpo.lora import load_peft_adapter

    cfg = run_config(
        tmp_path,
        lora={"enabled": True, "r": 8, "alpha": 16, "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
        grpo={"prompts_per_step": 8, "group_size": 8, "beta": 0.05},
        train={"steps": 4, "lr": 0.01, "micro_batch_size": 32},
        checkpoint={"every": 2, "keep_last": 3, "save_final": True, "save_merged": True},
    )
    records = launch(tmp_path, cfg)
    assert len(records) == 4 and records[-1]["kl"] > 0  # the adapters moved away from the base
    run = tmp_path / "runs" / "run"
    ckpt = run / "checkpoints" / "step_000004"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    base, _ = load_pretrained(tmp_path / "model")
    merged, _ = load_pretrained(run / "merged")
    adapted, _ = load_pretrained(tmp_path / "model")
    load_peft_adapter(adapted, ckpt)
    ids = torch.randint(3, 20, (2, 6))
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max() < 1e-4
        assert (merged(ids) - base(ids)).abs().max() > 1e-3
    # resume from the step-4 checkpoint for two more steps
    more = {**cfg, "train": {**cfg["train"], "steps": 6}}
    path = tmp_path / "more.yaml"
    path.write_text(yaml.safe_dump(more))
    main(["--config", str(path), "--resume"])
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # eval applies the adapter checkpoint to the base model named in its run config
    from minigrpo.eval import main as evaluate

    args = ["--split", "train", "--num", "16"]
    result = evaluate(["--checkpoint", str(run / "checkpoints" / "step_000006"), *args])
    plain = evaluate(["--checkpoint", str(run / "merged"), *args])  # the merged export of the same step
    assert result["num_examples"] == plain["num_examples"] == 16
    assert result["accuracy"] == plain["accuracy"] and result["reward"] == pytest.approx(plain["reward"])


def test_qlora_run_on_cpu(tmp_path):
    """NF4 base (bitsandbytes' CPU 4-bit path) + LoRA: the loop runs and the adapters train."""
    pytest.importorskip("bitsandbytes")
    cfg = run_config(
        tmp_path,
        lora={"enabled": True, "r": 8, "quantize_base": "nf4"},
        train={"steps": 3, "lr": 0.01, "micro_batch_size": 32},
        model={"name_or_path": str(tmp_path / "model"), "gradient_checkpointing": True},
        checkpoint={"every": 0, "save_final": True},
    )
    records = launch(tmp_path, cfg)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["grad_norm"] > 0 for r in records)
    # the adapters left their zero start (lora_B) and change the model's outputs
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "step_000003"
    tensors = checkpoint_tensors(ckpt)
    b_weights = [t for k, t in tensors.items() if "lora_B" in k]
    assert b_weights and all(t.abs().max() > 0 for t in b_weights)
    from minigrpo.lora import load_peft_adapter

    base, _ = load_pretrained(tmp_path / "model")
    adapted, _ = load_pretrained(tmp_path / "model")
    load_peft_adapter(adapted, ckpt)
    ids = torch.randint(3, 20, (2, 6))
    with torch.no_grad():
        assert (adapted(ids) - base(ids)).abs().max() > 1e-4


@pytest.mark.parametrize("seed", [-1, -(2**40), 2**32, 2**64 + 7])
def test_any_run_seed_seeds_every_generator(seed):
    """run.seed takes any integer: numpy's generator accepts only [0, 2**32) and torch's 64 bits, so
    each takes the seed modulo its range; the usual seeds keep exactly the streams they always had."""
    import random

    import numpy as np

    from minigrpo.build import seed_everything

    seed_everything(seed)  # raised numpy's "Seed must be between 0 and 2**32 - 1" before the run began
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(seed)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn
    seed_everything(1234)
    usual = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)
    assert usual == (random.random(), np.random.rand(), torch.rand(1).item())


def test_resume_after_the_data_file_changed_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """The checkpoint's data cursor counts 200 prompts with a fingerprint: a data file edited since is
    one `error:` line naming the file and the checkpoint, before the policy loads."""
    from minigrpo import build

    cfg = run_config(tmp_path, train={"steps": 1}, checkpoint={"every": 1})
    launch(tmp_path, cfg)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one prompt fewer

    def no_loading(*args, **kwargs):
        raise AssertionError("the policy loaded before the data was checked")

    monkeypatch.setattr(build, "load_policy", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, {**cfg, "train": {**cfg["train"], "steps": 2}}, "--resume")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --resume from ") and "step_000001" in message and str(data) in message
    assert "saved num_examples=200, this run has 199" in message


def test_ctrl_c_is_one_line_and_the_run_resumes_whole(tmp_path, monkeypatch, capsys):
    """Ctrl-C in step 4 (checkpoints every 2 steps): exit status 130 with one line naming the
    checkpoint to continue from, the curves of steps 1-3 drawn as the logger closes, and a --resume
    that redoes step 3 and 4 once each."""
    from minigrpo import train as train_module
    from minigrpo.plot import matplotlib_available

    cfg = run_config(
        tmp_path,
        train={"steps": 4},
        checkpoint={"every": 2, "keep_last": 5},
        log={"plots": True, "progress": False, "sample_every": 0},
    )
    rollout = train_module.rollout_phase

    def rollout_until_ctrl_c(*args, step, **kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return rollout(*args, step=step, **kwargs)

    monkeypatch.setattr(train_module, "rollout_phase", rollout_until_ctrl_c)
    try:
        launch(tmp_path, cfg)
        pytest.fail("the interrupted run returned")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt (a traceback), not one line and exit status 130")
    except SystemExit as e:
        assert e.code == 130
    run = tmp_path / "runs" / "run"
    newest = run / "checkpoints" / "step_000002"
    assert capsys.readouterr().err.strip() == f"interrupted: continue from {newest} with --resume"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    if matplotlib_available():  # drawn every 10 steps, and when the logger closes
        assert (run / "curves.png").stat().st_size > 0
    monkeypatch.undo()
    records = launch(tmp_path, cfg, "--resume")
    assert [r["step"] for r in records] == [1, 2, 3, 4]


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_a_resume_may_lower_what_a_step_holds_in_memory(tmp_path, capsys, loss_type):
    """Gradient checkpointing, activation offload and max_rows change memory, not the step's numbers:
    a resumed run may switch them (one that no longer fits after a restart would be stuck otherwise),
    and the micro-batch size too, except for bnpo, whose loss counts micro-batches."""
    cfg = run_config(tmp_path, train={"steps": 1}, grpo={"loss_type": loss_type}, checkpoint={"every": 1})
    launch(tmp_path, cfg)
    memory = {"gradient_checkpointing": True, "activation_offload": True}
    resumed = {**cfg, "model": {**cfg["model"], **memory}, "sampler": {**cfg["sampler"], "max_rows": 32}}
    resumed["train"] = {**cfg["train"], "steps": 2, "micro_batch_size": 32}
    if loss_type == "bnpo":
        with pytest.raises(SystemExit):
            launch(tmp_path, resumed, "--resume")
        message = capsys.readouterr().err
        assert "--resume with a changed config: train.micro_batch_size differs" in message, message
    else:
        assert [r["step"] for r in launch(tmp_path, resumed, "--resume")] == [1, 2]
