"""PPO's critic in a 16-bit run: its RMSNorm gains follow train.fp32_norms as the policy's do, so an
AdamW step at an RL learning rate moves them (a bf16 gain near 1 rounds a 1e-5 step away)."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from test_ppo import random_head, toy_rollout

from minigrpo.algorithms.value_model import build_critic
from minigrpo.config import load_config
from minigrpo.distributed import World
from minigrpo.grad_scale import optimizer_step
from minigrpo.models.transformer import RMSNorm


def gains(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, RMSNorm)]


@pytest.mark.parametrize("fp32_norms", [True, False])
def test_a_bf16_critic_keeps_its_norm_gains_as_train_fp32_norms_says(fp32_norms):
    cfg = load_config(None, ["algorithm=ppo", "grpo.group_size=1", "train.lr=1e-5", f"train.fp32_norms={fp32_norms}"])
    policy = tiny_model(dtype=torch.bfloat16)
    critic = build_critic(cfg, policy, torch.device("cpu"), torch.bfloat16, total_steps=10)
    random_head(critic.model)
    expected = torch.float32 if fp32_norms else torch.bfloat16
    assert gains(critic.model) and all(g.dtype == expected for g in gains(critic.model))
    linears = [p for n, p in critic.model.body.named_parameters() if n.endswith("proj.weight")]
    assert linears and all(p.dtype == torch.bfloat16 for p in linears)  # the rest stays in the compute dtype

    before = [g.detach().float().clone() for g in gains(critic.model)]
    r = toy_rollout(N=4, Tc=3)
    values = critic.model.values(r.input_ids(), r.attention_mask(), 3)  # (N, Tc) fp32
    assert torch.isfinite(values).all()
    (values * r.completion_mask).square().sum().backward()
    optimizer_step(cfg, critic.model, critic.optimizer, critic.scheduler, World(), critic.grad_scale)
    moved = max(float((g.detach().float() - b).abs().max()) for g, b in zip(gains(critic.model), before))
    if fp32_norms:  # AdamW's first step moves each gain by about lr
        assert 5e-6 < moved < 2e-5, moved
    else:  # bf16 near 1 steps by 2^-7: a step of 1e-5 is rounded away
        assert moved == 0.0


def test_a_critic_state_that_does_not_fit_is_a_one_line_checkpoint_error(tmp_path):
    """A resumed run's critic weights of another shape (a damaged or foreign state.json) name the file
    and the part, instead of load_state_dict's multi-line RuntimeError."""
    from minigrpo.algorithms.value_model import critic_state, load_critic_state
    from minigrpo.models.safetensors_io import CorruptCheckpointError

    cfg = load_config(None, ["algorithm=ppo", "grpo.group_size=1"])
    critic = build_critic(cfg, tiny_model(), torch.device("cpu"), torch.float32, total_steps=10)
    state = critic_state(critic)
    load_critic_state(critic, state, tmp_path)  # its own state fits
    state["weights"]["head.weight"] = torch.zeros(1, 3)
    with pytest.raises(CorruptCheckpointError) as e:
        load_critic_state(critic, state, tmp_path)
    message = str(e.value)
    assert "state.json: cannot restore its critic weights (RuntimeError:" in message and str(tmp_path) in message


def test_a_longer_resumed_ppo_run_notes_the_critics_rate_jump_too(tmp_path, capsys):
    """A 2-step linear PPO run extended to 4 steps on resume: the policy's schedule (lr 0.001) gave its step 3
    lr 0 and now 0.0005, the critic's own (ppo.value_lr 0.004) 0 and now 0.002. Only the policy's jump was
    noted; the note line names the critic's too, and the critic trains at the new rate."""
    from helpers.runs import launch, run_config

    cfg = run_config(
        tmp_path,
        algorithm="ppo",
        grpo={"prompts_per_step": 8, "group_size": 1},
        train={"steps": 2, "schedule": "linear", "micro_batch_size": 8},
        ppo={"value_lr": 0.004, "epochs": 1, "mini_batches": 1},  # one update per step
        checkpoint={"every": 1},
    )
    launch(tmp_path, cfg)
    capsys.readouterr()
    records = launch(tmp_path, {**cfg, "train": {**cfg["train"], "steps": 4}}, "--resume")
    notes = [line for line in capsys.readouterr().out.splitlines() if "learning-rate" in line]
    assert notes == [
        "note: the linear learning-rate schedule now spans train.steps=4: step 3 runs at lr 0.0005, where the "
        "schedule the checkpoint was saved with gave 0; PPO's critic's step 3 runs at lr 0.002, where its saved "
        "schedule gave 0"
    ]
    rates = [(r["lr"], r["ppo/value_lr"]) for r in records if r["step"] > 2]
    assert rates == [pytest.approx((0.0005, 0.002), rel=1e-9), pytest.approx((0.00025, 0.001), rel=1e-9)]
