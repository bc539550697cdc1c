"""The end of an update: the gradient norm in fp32, float16 loss scaling, non-finite updates skipped."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.rollouts import full_rollout
from helpers.tiny import tiny_model

from minigrpo import step
from minigrpo.distributed import World, clip_grad_norm
from minigrpo.grad_scale import MAX_SKIPS_IN_A_ROW, DivergedError, GradScale, optimizer_step
from minigrpo.optim import MasterWeights


def test_the_norm_of_bf16_gradients_is_taken_in_fp32():
    """torch's clip_grad_norm_ rounds each bf16 tensor's norm to bf16 (about 0.2% off here); ours
    is within 1e-6 of the fp64 norm, and the clipped gradients are the bf16 ones times one factor."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (1000, 3001, 17)]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 0.37).bfloat16()
    exact = float(torch.cat([p.grad.double() for p in params]).norm())
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, p in zip(theirs, params):
        t.grad = p.grad.clone()
    torch_norm = float(torch.nn.utils.clip_grad_norm_(theirs, float("inf")))
    assert abs(torch_norm - exact) / exact > 1e-4  # the reason for our own

    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, 1.0)
    assert abs(norm - exact) / exact < 1e-6
    factor = 1.0 / (norm + 1e-6)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, (b * factor).to(torch.bfloat16))


def test_a_loss_scale_is_divided_out_with_the_clip():
    """Gradients carrying a scale of 2^10: the norm returned is the unscaled one, the gradients end
    up unscaled (and clipped) in the same multiply."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0]) * 1024
    assert clip_grad_norm([p], float("inf"), grad_scale=1024.0) == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0]))
    p.grad = torch.tensor([3.0, 4.0, 0.0]) * 1024
    assert clip_grad_norm([p], 1.0, grad_scale=1024.0) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=0)


def test_the_scale_halves_on_overflow_and_doubles_after_a_streak():
    s = GradScale(enabled=True, scale=1024.0, growth_interval=3)
    assert s.record(float("inf")) is False and s.scale == 512.0 and s.skipped_updates == 1
    assert s.record(float("nan")) is False and s.scale == 256.0
    assert [s.record(1.0) for _ in range(2)] == [True, True] and s.scale == 256.0
    assert s.record(1.0) and s.scale == 512.0 and s.finite_in_a_row == 0
    assert s.skipped_updates == 2 and s.skips_in_a_row == 0

    plain = GradScale.for_dtype(torch.bfloat16)
    assert not plain.enabled and plain.scale == 1.0
    assert plain.record(float("nan")) is False and plain.scale == 1.0  # skipped, nothing to scale
    assert GradScale.for_dtype(torch.float16).scale == 2.0**16


def test_a_run_of_non_finite_updates_is_one_clear_error():
    s = GradScale()
    for _ in range(MAX_SKIPS_IN_A_ROW - 1):
        s.record(float("nan"))
    with pytest.raises(DivergedError, match=f"the last {MAX_SKIPS_IN_A_ROW} updates of the policy all had non-finite"):
        s.record(float("nan"))
    critic = GradScale()  # PPO's critic has its own scale and learning rate: the message names both
    for _ in range(MAX_SKIPS_IN_A_ROW - 1):
        critic.record(float("nan"), "PPO's critic", "ppo.value_lr")
    with pytest.raises(DivergedError, match=r"updates of PPO's critic all had .* lower ppo.value_lr or"):
        critic.record(float("nan"), "PPO's critic", "ppo.value_lr")


def test_the_scale_state_round_trips_between_float16_runs_only():
    s = GradScale(enabled=True, scale=64.0, finite_in_a_row=7, skipped_updates=3)
    resumed = GradScale.for_dtype(torch.float16)
    resumed.load_state_dict(s.state_dict())
    assert resumed == s
    other = GradScale.for_dtype(torch.bfloat16)
    other.load_state_dict(s.state_dict())
    assert other.scale == 1.0 and other.skipped_updates == 3
    with pytest.raises(ValueError, match="unknown grad scale state keys"):
        other.load_state_dict({"scael": 2.0})


class _Cfg:
    class train:
        max_grad_norm = 1.0


def _linear(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def test_a_non_finite_update_is_skipped_and_the_schedule_goes_on():
    model, optimizer, scheduler = _linear()
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    scale = GradScale(enabled=True, scale=8.0)
    norm, lr = optimizer_step(_Cfg, model, optimizer, scheduler, World(), scale)
    assert norm != norm and lr == 0.1  # NaN norm reported
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.param_groups[0]["lr"] == 0.05 and scale.scale == 4.0 and scale.skipped_updates == 1


def test_a_scaled_update_equals_the_unscaled_one():
    """Loss scaled by 2^12 (a power of two: the unscaling is exact) and the same loss unscaled give
    bit-identical AdamW steps, the clip included."""
    results = []
    for scale in (GradScale(), GradScale(enabled=True, scale=4096.0)):
        model, optimizer, scheduler = _linear(seed=1)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
        scale.scaled(model(x).square().sum()).backward()
        norm, _ = optimizer_step(_Cfg, model, optimizer, scheduler, World(), scale)
        results.append((norm, [p.detach().clone() for p in model.parameters()]))
    (n1, w1), (n2, w2) = results
    assert n1 == n2 and n1 > 1.0  # clipped
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


class _Recorder(torch.optim.Optimizer):
    """An inner optimizer that keeps a copy of the (fp32 master) gradients at step() and steps nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1.0})
        self.grads = []

    def step(self, closure=None):
        self.grads += [p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None]


class _NoSchedule:
    def step(self):
        pass


def _update_grads(model, cfg, batch, grad_scale):
    """The gradient the optimizer's fp32 masters receive in one update_phase, flattened."""
    optimizer = MasterWeights(list(model.parameters()), _Recorder)
    stats = step.update_phase(cfg, model, optimizer, _NoSchedule(), batch, None, None, grad_scale=grad_scale)
    return torch.cat([g.flatten() for g in optimizer.inner.grads]), stats


def test_float16_updates_keep_their_small_gradients_with_the_loss_scale():
    """Advantages of 1e-4 (rewards that differ a little): in float16 without a scale much of the
    backward's gradient underflows; with the run's loss scale the update's gradient is as close to
    the float32 model's as float16 gets with advantages of 1 (no underflow; divided by 1e4)."""
    from minigrpo.config import load_config
    from minigrpo.step import Batch

    B, G, Tp, Tc, V = 2, 4, 6, 10, 128
    cfg = load_config(
        None,
        ["run.device=cpu", f"grpo.prompts_per_step={B}", f"grpo.group_size={G}", "train.micro_batch_size=4",
         f"sampler.max_new_tokens={Tc}", "train.max_grad_norm=1000", "grpo.loss_type=dapo"],
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    N = B * G
    rollout = full_rollout(B, G, Tp, Tc, V, g)
    adv = 1e-4 * torch.randn(N, generator=g)
    batch = Batch(rollout, rewards=adv, advantages=adv, reward_metrics={}, prompts=[], answers=[])
    model32 = tiny_model(seed=5)
    model16 = copy.deepcopy(model32).half()

    exact, _ = _update_grads(model32, cfg, batch, GradScale())
    unscaled, _ = _update_grads(copy.deepcopy(model16), cfg, batch, GradScale())
    scaled, stats = _update_grads(copy.deepcopy(model16), cfg, batch, GradScale.for_dtype(torch.float16))
    large = Batch(rollout, rewards=adv, advantages=adv * 1e4, reward_metrics={}, prompts=[], answers=[])
    fp16_floor = _update_grads(copy.deepcopy(model16), cfg, large, GradScale())[0] / 1e4

    def rel(x):
        return float((x - exact).norm() / exact.norm())

    assert rel(fp16_floor) < 0.02, rel(fp16_floor)  # float16's own rounding
    assert rel(scaled) < 1.1 * rel(fp16_floor), (rel(scaled), rel(fp16_floor))
    assert rel(unscaled) > 10 * rel(fp16_floor), (rel(unscaled), rel(fp16_floor))
    assert stats["loss_scale"] == 2.0**16 and stats["skipped_updates"] == 0.0


def test_a_float16_run_saves_its_loss_scale_and_resumes_bit_identically(tmp_path, monkeypatch):
    """A float16 CPU run whose scale starts at 2 and doubles after every finite update (so it moves
    each step): 4 steps straight, and 2 steps + --resume to 4, end with the same scales, weights and
    metrics, and the checkpoint's state.json holds the scale."""
    import json

    from helpers.runs import launch, run_config

    from minigrpo import grad_scale as gs
    from minigrpo.checkpoint import load_trainer_state
    from minigrpo.models.safetensors_io import iter_tensors

    fast = classmethod(lambda cls, dtype: cls(enabled=True, scale=2.0, growth_interval=1))
    monkeypatch.setattr(gs.GradScale, "for_dtype", fast)
    runs = {}
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        root = tmp_path / name
        root.mkdir()
        cfg = run_config(root, run={"dtype": "float16"}, checkpoint={"every": 2, "keep_last": 5})
        for i, steps in enumerate(stops):
            records = launch(root, {**cfg, "train": {**cfg["train"], "steps": steps}}, *(["--resume"] if i else []))
        runs[name] = (records, root / "runs" / "run" / "checkpoints" / "step_000004")
    (straight, ckpt_a), (resumed, ckpt_b) = runs["straight"], runs["resumed"]
    assert [r["loss_scale"] for r in straight] == [r["loss_scale"] for r in resumed]
    assert len({r["loss_scale"] for r in straight}) > 1, "the scale never moved"
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    weights = [dict(iter_tensors(c / "model.safetensors")) for c in (ckpt_a, ckpt_b)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    saved = load_trainer_state(ckpt_a)["grad_scale"]
    assert saved["enabled"] is True and saved["scale"] == straight[-1]["loss_scale"], json.dumps(saved)


def test_a_float16_resume_of_a_bfloat16_checkpoint_starts_its_growth_streak_afresh():
    """A bfloat16 run counts 2500 finite updates; a float16 run resumed from its checkpoint starts at
    2^16 and doubles after 2000 finite updates of its own, as a fresh float16 scale does (the bfloat16
    count made it double on its first update)."""
    bf16 = GradScale.for_dtype(torch.bfloat16)
    for _ in range(2500):
        bf16.record(1.0)
    resumed, fresh = GradScale.for_dtype(torch.float16), GradScale.for_dtype(torch.float16)
    resumed.load_state_dict(bf16.state_dict())
    assert resumed.skipped_updates == 0 and resumed.scale == 2.0**16
    scales = [[(s.record(1.0), s.scale)[1] for _ in range(fresh.growth_interval)] for s in (resumed, fresh)]
    assert scales[0] == scales[1]
    assert scales[0][0] == 2.0**16 and scales[0][-2] == 2.0**16 and scales[0][-1] == 2.0**17


@pytest.mark.parametrize(
    ("key", "value"),
    [("scale", float("nan")), ("scale", float("inf")), ("scale", 0.0), ("scale", -8.0), ("scale", "65536"),
     ("growth_interval", 0), ("finite_in_a_row", -1), ("skips_in_a_row", 1.5), ("skipped_updates", None)],
)  # fmt: skip
def test_a_damaged_saved_loss_scale_is_one_error_naming_its_value(tmp_path, key, value):
    """A resume must not go on with a NaN/0/negative scale (every update skipped, or a zero loss) or a
    growth interval of 0 (doubling on every update): the checkpoint's state.json is named instead."""
    from minigrpo.checkpoint import CorruptCheckpointError, restoring

    state = {**GradScale.for_dtype(torch.float16).state_dict(), key: value}
    scale = GradScale.for_dtype(torch.float16)
    expected = rf"state.json: cannot restore its loss scale .*{key}="
    with pytest.raises(CorruptCheckpointError, match=expected), restoring(tmp_path, "loss scale"):
        scale.load_state_dict(state)
    assert scale == GradScale.for_dtype(torch.float16)  # nothing restored
