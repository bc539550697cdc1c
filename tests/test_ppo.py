"""PPO (algorithm: ppo): the critic (separate, from a reward model, LoRA), the update's micro-batch
invariance, the memory pre-flight, the config checks, and learning + resume on the CPU toy task.
The math is checked in tests/test_ppo_math.py."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model

from minigrpo import lora
from minigrpo.algorithms.value_model import (
    LoRAValueModel,
    SeparateValueModel,
    check_value_path,
    load_value_body,
    strip_lora,
)
from minigrpo.sampling.rollout import Rollout

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# ================================================================================================
# the critic


def toy_rollout(N=8, Tp=5, Tc=4, vocab=128, seed=0) -> Rollout:
    """Random prompts (left padded, lengths 2..Tp) and completions (right padded, lengths 1..Tc)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(2, Tp + 1, (N,), generator=g)
    c_len = torch.randint(1, Tc + 1, (N,), generator=g)
    cols_p, cols_c = torch.arange(Tp)[None], torch.arange(Tc)[None]
    prompt_mask = (cols_p >= Tp - p_len[:, None]).long()
    completion_mask = (cols_c < c_len[:, None]).long()
    prompt_ids = torch.randint(3, vocab, (N, Tp), generator=g) * prompt_mask
    completion_ids = torch.randint(3, vocab, (N, Tc), generator=g) * completion_mask
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampler_logp=torch.zeros(N, Tc),
        truncated=torch.zeros(N, dtype=torch.bool),
        completion_texts=[""] * N,
        prompt_index=torch.arange(N),
        group_size=1,
    )


def random_head(critic, seed=1):
    with torch.no_grad():
        critic.head.weight.copy_(torch.randn(critic.head.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return critic


def test_values_are_read_before_each_completion_token_and_ignore_padding():
    """values[:, t] = head . h[Tp - 1 + t] (the state before token t); a row alone, without any
    padding, gives the same values (1e-5 fp32). The head starts at zero."""
    policy = tiny_model()
    critic = SeparateValueModel(copy.deepcopy(policy))
    r = toy_rollout()
    ids, attn = r.input_ids(), r.attention_mask()
    assert (critic.values(ids, attn, 4) == 0).all()
    random_head(critic)
    values = critic.values(ids, attn, 4)  # (N, Tc)
    assert values.shape == (8, 4) and values.dtype == torch.float32
    with torch.no_grad():
        hidden = policy.hidden(ids, attention_mask=attn)  # the body is the policy's copy
    real = r.completion_mask.bool()  # (N, Tc): a pad after the completion has no value to read
    assert torch.allclose(values[real], (hidden[:, 4:8] @ critic.head.weight[0])[real], atol=1e-5)
    for i in range(8):
        p0 = int((r.prompt_mask[i] == 0).sum())
        n = int(r.completion_mask[i].sum())
        row = torch.cat([r.prompt_ids[i, p0:], r.completion_ids[i, :n]])[None]  # (1, T_i) no padding
        alone = critic.values(row, torch.ones_like(row), n)
        assert torch.allclose(alone[0], values[i, :n], atol=1e-5), (alone, values[i, :n])
    # a right-padded prompt (pads between prompt and completion) reads the same states: its last real token
    right_ids, right_attn = ids.clone(), attn.clone()
    for i in range(8):
        p0, Tp = int((r.prompt_mask[i] == 0).sum()), r.prompt_ids.shape[1]
        right_ids[i, :Tp] = torch.cat([r.prompt_ids[i, p0:], r.prompt_ids[i, :p0]])
        right_attn[i, :Tp] = torch.cat([r.prompt_mask[i, p0:], r.prompt_mask[i, :p0]])
    right = critic.values(right_ids, right_attn, 4)
    assert torch.allclose(right[real], values[real], atol=1e-5), (right - values).abs().max()


def test_separate_critic_copies_the_policy_without_its_adapters_and_lm_head():
    from minigrpo.config import LoRACfg

    policy = tiny_model()
    lora.apply_lora(policy, LoRACfg(enabled=True, r=4))
    body = strip_lora(copy.deepcopy(policy))
    assert not lora.lora_layers(body) and lora.lora_layers(policy) != {}
    critic = SeparateValueModel(body)
    assert critic.body.lm_head is None and all(p.requires_grad for p in critic.parameters())
    names = {n for n, _ in critic.named_parameters()}
    assert "head.weight" in names and "body.model.layers.0.self_attn.q_proj.weight" in names
    assert not any("lora" in n or "lm_head" in n for n in names)
    # the policy keeps its own weights (a copy, not shared)
    assert critic.body.model.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()


def sequence_classification_checkpoint(directory, seed=3):
    """A tiny LlamaForSequenceClassification checkpoint written by hand: our weights without the LM
    head, a random (1, D) score.weight, num_labels 1."""
    import json

    from safetensors.torch import load_file, save_file

    tiny_checkpoint(directory, seed=seed)
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1, pad_token_id=0)
    (directory / "config.json").write_text(json.dumps(config))
    weights = load_file(directory / "model.safetensors")
    weights.pop("lm_head.weight")
    weights["score.weight"] = torch.randn(1, config["hidden_size"], generator=torch.Generator().manual_seed(seed))
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return weights["score.weight"]


def test_critic_from_a_reward_model_starts_at_its_scores(tmp_path):
    """ppo.value_path naming a sequence-classification checkpoint: the score head becomes the value
    head, so the value before token t is the reward model's score of the text up to token t - 1."""
    from minigrpo.models.reward_model import load_reward_model

    score = sequence_classification_checkpoint(tmp_path / "rm")
    body, head = load_value_body(str(tmp_path / "rm"), dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(head.weight, score) and body.score is None
    critic = SeparateValueModel(body, head)
    rm, _ = load_reward_model(tmp_path / "rm", load_tokenizer=False)
    ids = torch.randint(3, 128, (2, 9))
    values = critic.values(ids, torch.ones_like(ids), 4)  # (2, 4): states before the last 4 tokens
    with torch.no_grad():
        for t in range(4):
            prefix = ids[:, : 5 + t]  # up to and including column 4 + t
            assert torch.allclose(values[:, t], rm(prefix)[:, 0], atol=1e-5)
    # a causal LM folder gives a zero head
    tiny_checkpoint(tmp_path / "lm")
    body, head = load_value_body(str(tmp_path / "lm"), dtype=torch.float32, device=torch.device("cpu"))
    assert head is None


def test_lora_critic_swaps_its_adapters_in_and_out():
    """The LoRA critic: its own adapter pairs in the policy's layers only inside active(); the policy's
    outputs and adapters are untouched by it; its gradients land on its own adapters and head only,
    the same with gradient checkpointing (whose recompute runs inside active())."""
    from minigrpo.config import LoRACfg

    policy = tiny_model()
    lora.apply_lora(policy, LoRACfg(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # the policy's adapters: not the start (B = 0), so the two sets differ
        for p in lora.lora_parameters(policy):
            p.normal_(0, 0.1)
    critic = random_head(LoRAValueModel(policy))
    for pair in critic.adapters.values():
        with torch.no_grad():
            pair.lora_B.weight.normal_(0, 0.1)
    r = toy_rollout()
    ids, attn = r.input_ids(), r.attention_mask()
    before = policy(ids, attention_mask=attn).detach()
    own = [p.data_ptr() for p in lora.lora_parameters(policy)]
    with pytest.raises(RuntimeError, match="active"):
        critic.values(ids, attn, 4)
    grads = {}
    for checkpointing in (False, True):
        policy.gradient_checkpointing = checkpointing
        policy.train()
        critic.zero_grad(set_to_none=True)
        with critic.active(), critic.active():  # nested: the outer one swaps back
            critic.values(ids, attn, 4).square().sum().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in critic.named_parameters()}
        assert all(p.grad is None for p in policy.parameters()), "the policy got a gradient"
    assert set(grads[False]) == {n for n, _ in critic.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads[False].values())
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-6), name
    assert [p.data_ptr() for p in lora.lora_parameters(policy)] == own
    policy.eval()
    assert torch.equal(policy(ids, attention_mask=attn).detach(), before)
    names = {n for n, _ in critic.named_parameters()}
    assert "head.weight" in names and not any(n.startswith("policy") for n in names)
    assert len(names) == 1 + 2 * len(lora.lora_layers(policy))


# ================================================================================================
# the update


def ppo_setup(micro_batch_size: int, *, mini_batches: int = 1, value_model: str = "separate", seed: int = 0, edit=None):
    """A PPO step's inputs on a tiny model: config, policy, critic (SGD both, so parameters move by
    exactly lr x gradient), a batch of 16 random rows (row 3 unscored), old and reference log-probs."""
    from minigrpo.algorithms.ppo_config import PPOCfg
    from minigrpo.algorithms.value_model import Critic, build_value_model
    from minigrpo.config import Config, LoRACfg
    from minigrpo.step import Batch, logprobs_phase

    cfg = Config(algorithm="ppo")
    cfg.ppo = PPOCfg(epochs=2, mini_batches=mini_batches, kl_coef=0.1, vf_coef=0.5, value_model=value_model)
    cfg.train.micro_batch_size = micro_batch_size
    cfg.lora = LoRACfg(enabled=value_model == "lora", r=4, alpha=8)
    policy = tiny_model(seed)
    if cfg.lora.enabled:
        lora.apply_lora(policy, cfg.lora)
    critic_model = random_head(build_value_model(cfg, policy, torch.device("cpu"), torch.float32), seed=seed + 1)

    def sgd(params):
        opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.05)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    optimizer, scheduler = sgd(policy.parameters())
    critic = Critic(critic_model, *sgd(critic_model.parameters()))
    r = toy_rollout(N=16, seed=seed)
    if edit is not None:
        edit(r)
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(seed))
    rewards[3] = float("nan")
    batch = Batch(r, rewards, torch.zeros(16), {}, [""] * 16, [""] * 16)
    old_logp = logprobs_phase(policy, r, 16, 1.0)  # (N, Tc)
    ref_logp = old_logp + 0.3 * torch.randn(old_logp.shape, generator=torch.Generator().manual_seed(7)) * r.loss_mask
    return cfg, policy, critic, optimizer, scheduler, batch, old_logp, ref_logp


def run_update(micro_batch_size: int, **kw):
    from minigrpo.algorithms.ppo import ppo_update

    cfg, policy, critic, optimizer, scheduler, batch, old_logp, ref_logp = ppo_setup(micro_batch_size, **kw)
    stats = ppo_update(cfg, policy, critic, optimizer, scheduler, batch, old_logp, ref_logp)
    params = {f"policy.{n}": p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    params |= {f"critic.{n}": p.detach().clone() for n, p in critic.model.named_parameters()}
    return stats, params, policy


@pytest.mark.parametrize("mini_batches,splits", [(1, (2, 8, 16)), (2, (2, 8))], ids=["one_mini_batch", "two"])
def test_update_is_the_same_for_every_micro_batch_split(mini_batches, splits):
    """Two epochs of PPO (4 optimizer steps per model with two mini-batches): the parameters of the
    policy and the critic after micro-batches of 2 equal those after 8 (or 16) within 1e-6 fp32, so
    every micro-batch split gives the same gradients, epoch after epoch."""
    runs = {mb: run_update(mb, mini_batches=mini_batches) for mb in splits}
    stats, ref, _ = runs[splits[-1]]
    start = ppo_setup(16)[1]
    moved = max((ref[f"policy.{n}"] - p).abs().max() for n, p in start.named_parameters())
    assert moved > 1e-3, "the policy did not move"
    for mb in splits[:-1]:
        other_stats, params, _ = runs[mb]
        for name, value in ref.items():
            diff = (params[name] - value).abs().max()
            assert diff < 1e-6, f"{name} differs between micro-batches of {mb} and {splits[-1]}: {diff:.2e}"
        for key in ("loss", "ppo/value_loss", "ppo/pg_loss", "ppo/approx_kl", "ppo/explained_variance", "grad_norm"):
            assert other_stats[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7), key
    assert stats["ppo/approx_kl"] > 0 and stats["ppo/ratio_max"] > 1  # later steps are off-policy
    assert 0 < stats["ppo/clip_frac"] < 1 and stats["ppo/value_loss"] > 0
    assert stats["ppo/kl"] != 0 and math.isfinite(stats["ppo/explained_variance"])


def test_unscored_rows_take_no_part():
    """Row 3 has no reward (NaN): its tokens can be anything, the update is the same (1e-6)."""

    def change_row_3(r: Rollout) -> None:
        r.completion_ids[3] = (r.completion_ids[3] + 5) % 128 * r.completion_mask[3]

    _, a, _ = run_update(8)
    _, b, _ = run_update(8, edit=change_row_3)
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-6, name


def test_lora_critic_update_trains_both_adapter_sets_and_leaves_the_base():
    start = ppo_setup(8, value_model="lora")[1]
    stats, params, policy = run_update(8, value_model="lora")
    assert math.isfinite(stats["loss"]) and stats["ppo/value_grad_norm"] > 0
    for name, p in start.named_parameters():  # the frozen base: bitwise the same
        if "lora_" not in name:
            assert torch.equal(dict(policy.named_parameters())[name], p), name
    policy_adapters = [k for k in params if k.startswith("policy.")]
    critic_adapters = [k for k in params if k.startswith("critic.adapters.")]
    assert policy_adapters and all("lora_" in k for k in policy_adapters)
    assert len(critic_adapters) == len(policy_adapters)
    b_moved = [params[k].abs().max() for k in policy_adapters + critic_adapters if "lora_B" in k]
    assert all(m > 0 for m in b_moved), "an adapter set did not train"


# ================================================================================================
# the memory pre-flight counts the critic


@pytest.mark.parametrize("value_model", ["separate", "lora"])
def test_preflight_counts_the_critic(value_model):
    """The critic's weights, gradients and AdamW state, measured on a built critic after one step,
    equal value_model_bytes, and the predicted update and optimizer phases grow by exactly those."""
    from minigrpo.algorithms.value_model import build_critic
    from minigrpo.config import load_config
    from minigrpo.memory import estimate_peak
    from minigrpo.memory_parts import value_model_bytes

    lora_on = [f"lora.enabled={value_model == 'lora'}", "lora.r=4"]
    grpo = load_config(None, ["run.device=cpu", *lora_on])
    ppo = load_config(
        None, ["run.device=cpu", "algorithm=ppo", "ppo.kl_coef=0", f"ppo.value_model={value_model}", *lora_on]
    )
    policy = tiny_model()
    if ppo.lora.enabled:
        lora.apply_lora(policy, ppo.lora)
    critic = build_critic(ppo, policy, torch.device("cpu"), torch.float32, total_steps=10)
    params = list(critic.model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    critic.optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in params)
    state = sum(t.nbytes for s in critic.optimizer.state.values() for t in s.values() if t.ndim > 0)
    parts = value_model_bytes(policy.args, ppo, 4)
    assert parts["weights"] == parts["gradients"] == weights and parts["masters"] == 0
    assert parts["optimizer"] == state == 2 * weights
    if value_model == "separate":  # the policy's body without its LM head, and the head
        lm_head = policy.args.vocab_size * policy.args.dim
        assert weights == 4 * (policy.args.num_params() - lm_head + policy.args.dim)
    a = estimate_peak(grpo, policy.args, prompt_tokens=8, device_type="cpu")
    b = estimate_peak(ppo, policy.args, prompt_tokens=8, device_type="cpu")
    assert b.phases["update"] - a.phases["update"] == weights + weights + state  # + gradients
    # the optimizer phase: + the critic's weights and state; the two AdamW steps run one after the
    # other: the policy's beside both models' gradients, then the critic's (its gradients and its
    # temporaries, 4 bytes per stepped value: `weights` in fp32) once the policy's step freed its own
    policy_step = a.parts["gradients"] + a.parts["optimizer_step_transient"]
    extra = max(0, weights - policy_step)  # the critic's step is the larger
    assert b.phases["optimizer"] - a.phases["optimizer"] == 2 * weights + state + extra
    # measured against a real PPO update: tests/test_memory.py::test_ppo_update_peak_matches_the_estimate
    assert b.parts["value_model"] == weights and "value_model" in b.table()


# ================================================================================================
# the config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.epochs=2"], "ppo.epochs=2: the ppo section is read only with algorithm: ppo"),
        (["grpo.group_size=1"], "grpo.group_size must be >= 2, got 1 (advantages compare the completions"),
        (["algorithm=ppo", "ppo.value_model=lora"], "ppo.value_model=lora puts the critic's adapters on the policy"),
        (["algorithm=ppo", "ppo.mini_batches=3"], "ppo.mini_batches (3) must divide the 64 rows of a step"),
        (["algorithm=ppo", "grpo.beta=0.1"], "grpo.beta (0.1) is GRPO's KL weight; PPO's KL penalty is ppo.kl_coef"),
        (["algorithm=ppo", "grpo.num_iterations=2"], "PPO's are ppo.epochs: set grpo.num_iterations=1"),
        (["algorithm=ppo", "grpo.dynamic_sampling=true"], "set grpo.dynamic_sampling=false"),
        (["algorithm=ppo", "grpo.epsilon=0.3"], "grpo.epsilon=0.3: GRPO's objective settings are not read with"),
        (["algorithm=ppo", "grpo.epsilon_high=0.28"], "grpo.epsilon_high=0.28: GRPO's objective settings"),
        (["algorithm=ppo", "ppo.epochs=0"], "ppo.epochs must be >= 1, got 0"),
        (["algorithm=ppo", "ppo.lam=1.5"], "ppo.lam must be in [0, 1], got 1.5"),
        (["algorithm=ppo", "ppo.value_model=critic"], "ppo.value_model: expected one of 'separate', 'lora', got"),
        (
            ["algorithm=ppo", "lora.enabled=true", "lora.quantize_base=nf4"],
            "ppo.value_model=separate copies the policy's base and trains every weight, which an nf4 base cannot",
        ),
        (
            ["algorithm=ppo", "lora.enabled=true", "ppo.value_model=lora", "ppo.value_path=rm"],
            "ppo.value_path='rm' is read only with ppo.value_model=separate",
        ),
        # the lower clip bound 1 - clip_eps must stay above 0 (a ratio is > 0): 1 or more never clips
        (["algorithm=ppo", "ppo.clip_eps=1"], "ppo.clip_eps must be in (0, 1), got 1.0"),
        (["algorithm=ppo", "ppo.clip_eps=1.5"], "ppo.clip_eps must be in (0, 1), got 1.5"),
        # a critic loss of weight 0 gives it no gradient: AdamW's weight decay alone would shrink it
        (["algorithm=ppo", "ppo.vf_coef=0"], "ppo.vf_coef must be > 0, got 0"),
        (
            ["algorithm=ppo", "sampler.kind=vllm", "grpo.is_correction=sequence_mask"],
            "grpo.is_correction='sequence_mask' weights GRPO's loss by the sampler's log-probs, which algorithm: ppo",
        ),
        (
            ["algorithm=ppo", "grpo.prompts_per_step=1", "train.micro_batch_size=1", "sampler.max_new_tokens=1"],
            "ppo.whiten_advantages=true over a step of one token",
        ),
    ],
)
def test_config_errors_are_one_line_each(overrides, message):
    from minigrpo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        base = ["grpo.prompts_per_step=64", "grpo.group_size=1"] if "algorithm=ppo" in overrides else []
        load_config(None, [*base, *overrides])
    text = str(e.value)
    problems = text.splitlines()[1:] if text.startswith("invalid config:") else text.splitlines()
    assert len(problems) == 1 and message in problems[0], text


@pytest.mark.parametrize("value_path", ["", "  "])
def test_an_empty_value_path_is_a_config_error(value_path, tmp_path):
    """value_path '' (YAML: value_path: "") used to load: Path('') is '.', so the error that came later
    named the working directory instead of the setting."""
    from minigrpo.config import ConfigError, load_config

    path = tmp_path / "ppo.yaml"
    rollout = "grpo: {prompts_per_step: 64, group_size: 1}"
    path.write_text(f"algorithm: ppo\n{rollout}\nppo: {{value_path: '{value_path}'}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 1 and f"ppo.value_path={value_path!r} is empty" in problems[0], str(e.value)


def test_one_token_steps_load_without_whitening():
    from minigrpo.config import load_config

    one = ["algorithm=ppo", "grpo.prompts_per_step=1", "grpo.group_size=1", "train.micro_batch_size=1"]
    cfg = load_config(None, [*one, "sampler.max_new_tokens=1", "ppo.whiten_advantages=false"])
    assert cfg.ppo.whiten_advantages is False
    assert load_config(None, [*one, "sampler.max_new_tokens=2"]).ppo.whiten_advantages  # two tokens: fine


def test_a_ppo_config_loads_and_checks_before_loading(tmp_path):
    from minigrpo.build import validate_distributed
    from minigrpo.config import load_config
    from minigrpo.errors import UserError

    cfg = load_config(CONFIGS / "smollm2_arith_ppo.yaml")
    assert cfg.algorithm == "ppo" and cfg.grpo.group_size == 1 and cfg.ppo.value_model == "separate"
    validate_distributed(cfg, 2)  # torchrun: tests/test_ppo_distributed.py
    with pytest.raises(UserError, match=r"^ppo.value_path='.*missing' does not exist$"):
        check_value_path(str(tmp_path / "missing"))
    sequence_classification_checkpoint(tmp_path / "rm")
    check_value_path(str(tmp_path / "rm"))  # a reward model: fine
    tiny_checkpoint(tmp_path / "policy")
    check_value_path(str(tmp_path / "rm"), policy=str(tmp_path / "policy"))  # the same vocabulary
    tiny_checkpoint(tmp_path / "big", vocab_size=256)
    with pytest.raises(UserError, match=r"^ppo.value_path='.*rm': a vocabulary of 128 tokens, the policy .* 256"):
        check_value_path(str(tmp_path / "rm"), policy=str(tmp_path / "big"))  # named before anything loads
    (tmp_path / "rm" / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match=r"^ppo.value_path="):
        check_value_path(str(tmp_path / "rm"))


# ================================================================================================
# the loop: learning and resuming (python -m minigrpo.train, in process)


PPO_TOY = {"algorithm": "ppo", "grpo": {"prompts_per_step": 64, "group_size": 1}}


def test_ppo_learns_a_one_token_task(tmp_path):
    """The copy task ('repeat 7' -> '7', chance 1/28) with one completion per prompt: the critic
    learns the value of each prompt (explained variance rises) and the reward rises as in the GRPO
    learning test. Observed: 0.03 at step 1, mean 0.87 over steps 31-40."""
    from helpers.runs import launch, run_config

    cfg = run_config(
        tmp_path,
        **PPO_TOY,
        train={"steps": 40, "lr": 0.001, "micro_batch_size": 64},
        ppo={"epochs": 2, "kl_coef": 0.01, "value_lr": 0.001},
    )
    records = launch(tmp_path, cfg)
    rewards = [r["reward"] for r in records]
    assert rewards[0] <= 0.2, f"the untrained policy should be near chance: {rewards[:5]}"
    assert sum(rewards[-10:]) / 10 >= 0.8, f"the policy did not learn: {[round(r, 2) for r in rewards]}"
    ev = [r["ppo/explained_variance"] for r in records]
    assert ev[0] == 0.0 and sum(ev[-10:]) / 10 > 0.5, ev  # the zero head explains nothing, then learns
    assert records[-1]["entropy"] < records[0]["entropy"] / 2
    for key in ("ppo/value_loss", "ppo/clip_frac", "ppo/approx_kl", "ppo/kl", "ppo/returns_mean", "ppo/advantages_std"):
        assert all(math.isfinite(r[key]) for r in records), key


@pytest.mark.parametrize(
    "variant",
    [{}, {"lora": {"enabled": True, "r": 4, "alpha": 8}, "ppo": {"value_model": "lora"}}],
    ids=["separate_critic", "lora_critic"],
)
def test_ppo_resumes_to_identical_policy_critic_and_metrics(tmp_path, variant):
    """4 steps straight vs 2 steps, then --resume to 4: the policy, the critic (weights and optimizer)
    and every non-timing metric are identical (two epochs of two shuffled mini-batches per step)."""
    from helpers.runs import TIMING, launch, run_config

    from minigrpo.checkpoint import load_trainer_state

    ppo = {"epochs": 2, "mini_batches": 2, "kl_coef": 0.05, **variant.get("ppo", {})}
    base = run_config(
        tmp_path,
        algorithm="ppo",
        grpo={"prompts_per_step": 16, "group_size": 1},
        train={"steps": 4, "lr": 0.003, "micro_batch_size": 4},
        checkpoint={"every": 2, "keep_last": 5, "save_final": True},
        ppo=ppo,
        **{k: v for k, v in variant.items() if k != "ppo"},
    )
    straight = launch(tmp_path, {**base, "run": {**base["run"], "name": "straight"}})
    part = {**base, "run": {**base["run"], "name": "part"}, "train": {**base["train"], "steps": 2}}
    launch(tmp_path, part)
    resumed = launch(tmp_path, {**part, "train": base["train"]}, "--resume")

    def clean(records):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]

    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert clean(resumed) == clean(straight)
    a = tmp_path / "runs" / "straight" / "checkpoints" / "step_000004"
    b = tmp_path / "runs" / "part" / "checkpoints" / "step_000004"
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (a / name).exists():
            from safetensors.torch import load_file

            x, y = load_file(a / name), load_file(b / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    sa, sb = load_trainer_state(a)["critic"], load_trainer_state(b)["critic"]
    assert sa["weights"].keys() == sb["weights"].keys() and "head.weight" in sa["weights"]
    for k in sa["weights"]:
        assert torch.equal(sa["weights"][k], sb["weights"][k]), k
    moments = sa["optimizer"]["state"]
    assert moments and all(
        torch.equal(v, sb["optimizer"]["state"][n][key]) for n, s in moments.items() for key, v in s.items()
    )
    assert sa["scheduler"] == sb["scheduler"]
    first = load_trainer_state(tmp_path / "runs" / "straight" / "checkpoints" / "step_000002")["critic"]
    assert not torch.equal(first["weights"]["head.weight"], sa["weights"]["head.weight"]), "the critic did not train"


def test_a_critic_whose_tokenizer_numbers_tokens_otherwise_is_warned_about(tmp_path):
    """A reward model with another tokenizer but no fewer ids (Mistral's 32768 against a Llama-2 policy's
    32000) passed the vocabulary-size check, and the critic read the policy's ids as other tokens: a
    warning naming both folders and how many tokens differ; the same tokenizer is silent."""
    import warnings

    from tokenizers import Tokenizer, models

    sequence_classification_checkpoint(tmp_path / "rm")
    tiny_checkpoint(tmp_path / "policy")
    words = {f"w{i}": i for i in range(128)}
    Tokenizer(models.WordLevel(words, unk_token="w0")).save(str(tmp_path / "policy" / "tokenizer.json"))
    swapped = {**words, "w5": 6, "w6": 5}
    Tokenizer(models.WordLevel(swapped, unk_token="w0")).save(str(tmp_path / "rm" / "tokenizer.json"))
    with pytest.warns(UserWarning, match=r"rm's tokenizer numbers 2 of the policy's tokens otherwise"):
        check_value_path(str(tmp_path / "rm"), policy=str(tmp_path / "policy"))
    Tokenizer(models.WordLevel(words, unk_token="w0")).save(str(tmp_path / "rm" / "tokenizer.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_value_path(str(tmp_path / "rm"), policy=str(tmp_path / "policy"))
