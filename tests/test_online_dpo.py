"""Online DPO (`algorithm: online_dpo`): the loss against fp64 references written from the papers,
the pairs (ties and unscored rows skipped and counted), a gradient that does not depend on the
micro-batch split, the config checks, and runs of the loop on the CPU copy task: the reward rises,
--resume continues exactly, LoRA's reference is the adapters-off model, two gloo ranks equal one
process, and the memory pre-flight counts the reference copy."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.cli import cli_env
from helpers.runs import TIMING, launch, run_config
from helpers.tiny import tiny_model
from safetensors.torch import load_file

from minigrpo.algorithms import dpo
from minigrpo.algorithms.online_dpo import make_pairs, pack_groups, pair_backward
from minigrpo.config import ConfigError, load_config
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.rollout import Rollout
from minigrpo.step import Batch, logprobs_phase
from minigrpo.train import main

# ----------------------------------------------------------------------------- the loss, from the papers


def reference_loss(pc, pr, rc, rr, beta, kind, eps=0.0):
    """Per-pair losses in Python floats (fp64), straight from the papers: DPO (Rafailov et al. 2023,
    eq. 7) -log sigma(beta * h), its label-smoothed form (Mitchell 2023, cDPO), IPO (Azar et al. 2023,
    eq. 17) (h - 1 / (2 tau))^2, with h = log pi(c)/pi_ref(c) - log pi(r)/pi_ref(r)."""

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - c) - (b - d)
        if kind == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            out.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
    return out


@pytest.mark.parametrize(("kind", "beta", "eps"), [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.2), ("ipo", 0.3, 0.0)])
def test_loss_equals_the_papers_in_fp64(kind, beta, eps):
    P = 9
    pc, pr = -torch.rand(P, dtype=torch.float64) * 30, -torch.rand(P, dtype=torch.float64) * 30
    rc, rr = pc + torch.randn(P, dtype=torch.float64) * 3, pr + torch.randn(P, dtype=torch.float64) * 3
    pc.requires_grad_(True)
    loss, stats = dpo.dpo_loss(pc, pr, rc, rr, beta=beta, loss=kind, label_smoothing=eps, num_pairs=12)
    per_pair = reference_loss(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, kind, eps)
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach()) - sum(per_pair) / 12) <= 1e-10  # divided by the step's pairs, not these 9
    # d loss / d logp_chosen: sigmoid -beta (sigma(-beta h) (1 - eps) - eps sigma(beta h)); ipo 2 (h - 1/(2 beta))
    loss.backward()
    h = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    sig = [1 / (1 + math.exp(-x)) for x in (beta * v for v in h)]
    if kind == "ipo":
        expected = [2 * (v - 1 / (2 * beta)) / 12 for v in h]
    else:
        expected = [-beta * ((1 - eps) * (1 - s) - eps * s) / 12 for s in sig]
    assert max(abs(g - e) for g, e in zip(pc.grad.tolist(), expected)) <= 1e-10
    # implicit rewards beta * (logp - ref): accuracy and margin
    margins = [beta * v for v in h]
    assert abs(float(stats["margin"]) - sum(margins) / P) <= 1e-6  # stats are fp32
    assert float(stats["accuracy"]) == pytest.approx(sum(m > 0 for m in margins) / P, abs=1e-7)
    assert float(stats["logp_chosen"]) == pytest.approx(float(pc.detach().mean()), rel=1e-6)


def test_token_logprobs_to_loss_stay_in_fp64():
    """From fp64 token log-probs (4 pairs of 50-token completions, padding -inf) to the loss: the
    sequence sums are not rounded to fp32 on the way (fp32 would be off by ~1e-5), so the loss is
    the fp64 reference's within 1e-10."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 60, generator=g, dtype=torch.float64) * 5  # (8, Tc): rows 0-3 chosen, 4-7 rejected
    ref = logp + torch.randn(8, 60, generator=g, dtype=torch.float64) * 0.1
    mask = (torch.arange(60)[None] < torch.tensor([50, 41, 60, 33, 50, 57, 12, 60])[:, None]).long()
    logp, ref = logp.masked_fill(mask == 0, -math.inf), ref.masked_fill(mask == 0, -math.inf)
    seq, ref_seq = dpo.sequence_logprobs(logp, mask), dpo.sequence_logprobs(ref, mask)
    assert seq.dtype == torch.float64
    want = [sum(float(x) for x in row[m > 0]) for row, m in zip(logp, mask)]
    assert max(abs(a - b) for a, b in zip(seq.tolist(), want)) <= 1e-10
    loss, _ = dpo.dpo_loss(seq[:4], seq[4:], ref_seq[:4], ref_seq[4:], beta=0.5)
    ref_want = [sum(float(x) for x in row[m > 0]) for row, m in zip(ref, mask)]
    per_pair = reference_loss(want[:4], want[4:], ref_want[:4], ref_want[4:], 0.5, "sigmoid")
    assert abs(float(loss) - sum(per_pair) / 4) <= 1e-10


def test_worked_example_of_the_module_docstring():
    t = [torch.tensor([v], dtype=torch.float64) for v in (-1.0, -3.0, -2.0, -2.5)]
    sigmoid, stats = dpo.dpo_loss(*t, beta=0.5)
    ipo, _ = dpo.dpo_loss(*t, beta=0.5, loss="ipo")
    assert float(sigmoid) == pytest.approx(0.386871006, abs=1e-9) and float(ipo) == pytest.approx(0.25, abs=1e-12)
    assert float(stats["accuracy"]) == 1.0 and float(stats["margin"]) == pytest.approx(0.75)
    assert float(stats["reward_chosen"]) == pytest.approx(0.5) and float(stats["reward_rejected"]) == -0.25


def test_loss_edge_cases_and_argument_errors():
    empty = torch.zeros(0, requires_grad=True)
    loss, stats = dpo.dpo_loss(empty, empty, empty, empty, beta=0.1, num_pairs=3)
    loss.backward()  # a graph even without pairs
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
    big = torch.tensor([500.0, -500.0])  # h = +-1000: -log sigmoid stays finite
    loss, _ = dpo.dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(500.0)
    one = torch.zeros(1)
    for kwargs, match in [
        ({"beta": 0.0}, "beta"),
        ({"beta": 0.1, "loss": "hinge"}, "loss"),
        ({"beta": 0.1, "loss": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ]:
        with pytest.raises(ValueError, match=match):
            dpo.dpo_loss(one, one, one, one, **kwargs)
    assert float(dpo.sequence_logprobs(torch.tensor([[-1.0, -2.0, -math.inf]]), torch.tensor([[1, 1, 0]]))) == -3.0


# ----------------------------------------------------------------------------- pairs

NAN = math.nan
# 4 groups of 4: ranked; all equal; two NaN rows; a NaN row and a tie at the top
REWARDS = torch.tensor([1, 0, 0.5, 0, 1, 1, 1, 1, NAN, 0.2, 0.9, NAN, 0, 1, NAN, 1])


def test_best_worst_pairs_skip_and_count_ties():
    chosen, rejected, ties = dpo.preference_pairs(REWARDS, 4, "best_worst")
    # group 0: best row 0, worst row 1 (the first of the equal lowest); group 1 ties; group 2: 10 over 9;
    # group 3: the first of the best (13) over 12
    assert chosen.tolist() == [0, 10, 13] and rejected.tolist() == [1, 9, 12] and ties == 1
    assert dpo.preference_pairs(torch.tensor([NAN, 1.0, NAN, NAN]), 4)[2] == 1  # one scored row: no pair


def test_all_pairs_rank_every_two_and_count_the_rest():
    chosen, rejected, ties = dpo.preference_pairs(REWARDS, 4, "all")
    pairs = list(zip(chosen.tolist(), rejected.tolist()))
    assert pairs == [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3), (10, 9), (13, 12), (15, 12)]
    assert ties == 16 and len(pairs) + ties == 4 * 6  # every candidate pair is either trained or counted


def test_pair_batch_keeps_the_used_rows_group_by_group():
    batch = make_batch(REWARDS, group_size=4)
    pairs = make_pairs(batch, 4, "all")
    assert pairs.rollout.num_sequences == 9  # rows 0-3, 9-10, 12, 13, 15
    assert pairs.groups == [(0, 4), (4, 6), (6, 9)] and pairs.ties == 16 and pairs.unscored == 3
    assert pairs.rollout.completion_texts == [
        batch.rollout.completion_texts[i] for i in (0, 1, 2, 3, 9, 10, 12, 13, 15)
    ]
    assert pack_groups(pairs.groups, 6) == [(0, 6), (6, 9)] and pack_groups(pairs.groups, 2) == pairs.groups


# ----------------------------------------------------------------------------- the gradient


def make_batch(rewards: torch.Tensor, group_size: int, seed: int = 0) -> Batch:
    """Random prompts (left padded) and completions (right padded, 1-6 tokens) for the given rewards."""
    g = torch.Generator().manual_seed(seed)
    N, Tp, Tc = rewards.shape[0], 5, 6
    prompt_len = torch.randint(2, Tp + 1, (N,), generator=g)
    completion_len = torch.randint(1, Tc + 1, (N,), generator=g)
    prompt_mask = (torch.arange(Tp) >= Tp - prompt_len[:, None]).long()  # (N, Tp)
    completion_mask = (torch.arange(Tc) < completion_len[:, None]).long()  # (N, Tc)
    rollout = Rollout(
        prompt_ids=torch.randint(3, 128, (N, Tp), generator=g) * prompt_mask,
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, 128, (N, Tc), generator=g) * completion_mask,
        completion_mask=completion_mask,
        sampler_logp=torch.zeros(N, Tc),
        truncated=torch.zeros(N, dtype=torch.bool),
        completion_texts=[f"row {i}" for i in range(N)],
        prompt_index=torch.arange(N) // group_size,
        group_size=group_size,
    )
    return Batch(rollout, rewards.float(), torch.zeros(N), {}, ["p"] * N, ["a"] * N)


def grads_of(model, size: int, pairs, ref_seq, opts, num_pairs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    parts, _ = pair_backward(model, pairs, ref_seq, opts, size=size, temperature=0.7, num_pairs=num_pairs)
    assert sum(w for _, w in parts) == num_pairs
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("mode", "sizes"), [("best_worst", (2, 8)), ("all", (4, 16))])
def test_gradient_does_not_depend_on_the_micro_batch_split(mode, sizes):
    """Two packings of the groups give the gradient of the whole step's loss computed in one go."""
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    batch = make_batch(REWARDS, group_size=4)
    pairs = make_pairs(batch, 4, mode)
    opts = load_config(None, ["algorithm=online_dpo", "dpo.beta=0.5"]).dpo
    P = len(pairs.chosen)
    with torch.no_grad():
        ref_seq = dpo.sequence_logprobs(logprobs_phase(reference, pairs.rollout, 3, 0.7), pairs.rollout.loss_mask)
    small, large = (grads_of(policy, s, pairs, ref_seq, opts, P) for s in sizes)
    # the reference gradient: every row in one forward, the loss of every pair at once
    policy.zero_grad(set_to_none=True)
    r = pairs.rollout
    logp = completion_logprobs(policy, r.input_ids(), r.attention_mask(), r.completion_mask, temperature=0.7)
    seq = dpo.sequence_logprobs(logp, r.loss_mask)  # (n,)
    c, j = pairs.chosen, pairs.rejected
    dpo.dpo_loss(seq[c], seq[j], ref_seq[c], ref_seq[j], beta=0.5)[0].backward()
    for name, p in policy.named_parameters():
        scale = float(p.grad.abs().max())
        assert scale > 1e-5, f"{name}: no gradient, the comparison would mean nothing"
        for got in (small[name], large[name]):
            worst = float((got - p.grad).abs().max())
            assert worst <= 1e-6, f"{name}: {worst:.2e} (gradient scale {scale:.2e})"


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["algorithm=online_dpo", "grpo.group_size=1"], "grpo.group_size must be >= 2"),
        (["algorithm=dpo"], "algorithm"),
        (["algorithm=online_dpo", "dpo.beta=0"], "dpo.beta"),
        (["algorithm=online_dpo", "dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing (0.1) applies"),
        (["algorithm=online_dpo", "grpo.beta=0.04"], "grpo.beta (0.04) is GRPO's KL weight"),
        (["algorithm=online_dpo", "train.micro_batch_size=1"], "train.micro_batch_size (1) must be >= 2"),
        (["algorithm=online_dpo", "dpo.pairs=all", "grpo.group_size=8", "train.micro_batch_size=4"], ">= 8"),
        (["dpo.beta=0.3"], "dpo.beta=0.3: the dpo section is read only with algorithm: online_dpo"),
        (
            ["algorithm=online_dpo", "grpo.loss_type=grpo", "grpo.mask_truncated_completions=true"],
            "grpo.loss_type='grpo', grpo.mask_truncated_completions=True: GRPO's objective settings are not read",
        ),
        # DPO's sequence log-probs are the trainer's: a sampler correction set by hand was silently ignored
        (
            ["algorithm=online_dpo", "grpo.is_correction=token_mask"],
            "grpo.is_correction='token_mask' weights GRPO's loss by the sampler's log-probs, which algorithm: "
            "online_dpo does not read",
        ),
    ],
)
def test_config_mistakes_are_one_error_line(tmp_path, capsys, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)
    with pytest.raises(SystemExit) as exit_:  # the command line: one `error:` line, no traceback
        main(["--set", *overrides, f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_online_dpo_config_is_accepted():
    cfg = load_config(None, ["algorithm=online_dpo", "dpo.pairs=all", "grpo.group_size=4", "train.micro_batch_size=8"])
    assert cfg.algorithm == "online_dpo" and cfg.dpo.beta == 0.1 and cfg.dpo.loss == "sigmoid"
    assert load_config("configs/smollm2_arith_online_dpo.yaml").algorithm == "online_dpo"
    vllm = load_config(None, ["algorithm=online_dpo", "sampler.kind=vllm"])  # the derived correction passes
    assert vllm.grpo.is_correction == "token_truncate"


def test_memory_preflight_counts_the_reference_copy():
    from minigrpo.memory import estimate_peak
    from minigrpo.models.args import ModelArgs
    from minigrpo.models.presets import preset_config

    args = ModelArgs.from_hf_config(preset_config("qwen2.5-0.5b"))

    def parts(*overrides):
        est = estimate_peak(load_config(None, list(overrides)), args, prompt_tokens=64)
        return est.parts, est.phases

    grpo, grpo_phases = parts()
    online, online_phases = parts("algorithm=online_dpo")
    lora, _ = parts("algorithm=online_dpo", "lora.enabled=true")
    assert grpo["reference_model"] == 0 and lora["reference_model"] == 0  # beta 0 / adapters switched off
    assert online["reference_model"] == online["weights"] > 0
    assert grpo_phases["logprobs"] == 0 < online_phases["logprobs"]  # the reference pass


# ----------------------------------------------------------------------------- the loop


def dpo_config(tmp_path, **sections) -> dict:
    """The GRPO learning test's copy task and tiny model, trained with online DPO."""
    base = run_config(
        tmp_path,
        algorithm="online_dpo",
        grpo={"prompts_per_step": 8, "group_size": 8},
        train={"steps": 50, "lr": 0.003, "micro_batch_size": 64},
        dpo={"beta": 0.1},
    )
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


@pytest.mark.parametrize(("loss", "goal"), [("sigmoid", 0.9), ("ipo", 0.75)])
def test_online_dpo_learns_the_copy_task(tmp_path, loss, goal):
    """From near chance (0.05 in the first 5 steps) to 0.97 (sigmoid) / 0.89 (ipo) in the last 10
    of 50 steps (IPO's squared loss stops at a log-ratio margin of 1 / (2 beta), so it moves less)."""
    records = launch(tmp_path, dpo_config(tmp_path, dpo={"loss": loss}))
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert first <= 0.15, f"the untrained policy should be near chance: {rewards[:5]}"
    assert last >= goal, f"the policy did not learn: {[round(r, 2) for r in rewards]}"
    for r in records:  # best_worst: every group is a pair or a tie
        assert r["dpo/pairs"] + r["dpo/ties"] == 8 and r["dpo/unscored"] == 0
    trained = [r for r in records if r["dpo/pairs"]]
    assert sum(r["dpo/accuracy"] for r in trained[-10:]) / 10 >= 0.7  # the chosen are now the likelier ones
    assert all(r["dpo/logp_chosen"] <= 0 and r["dpo/logp_rejected"] <= 0 for r in trained)
    assert trained[-1]["dpo/margin"] > 0


def test_online_dpo_resumes_exactly(tmp_path):
    """Two steps, then --resume for two more: weights and metrics equal four uninterrupted steps
    (the reference is the initial policy in both, not the checkpoint's weights)."""
    base = dpo_config(tmp_path, train={"steps": 4}, checkpoint={"every": 2, "keep_last": 3, "save_final": True})
    straight = launch(tmp_path, {**base, "run": {**base["run"], "name": "straight"}})
    halted = {**base, "run": {**base["run"], "name": "halted"}, "train": {**base["train"], "steps": 2}}
    launch(tmp_path, halted)
    resumed = launch(tmp_path, {**halted, "train": base["train"]}, "--resume")
    assert sum(r["dpo/pairs"] for r in straight[2:]) > 0, "no pair after the resume: the test would prove nothing"
    runs = tmp_path / "runs"
    a = load_file(runs / "straight" / "checkpoints" / "step_000004" / "model.safetensors")
    b = load_file(runs / "halted" / "checkpoints" / "step_000004" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: {(a[name] - b[name]).abs().max():.2e}"

    def untimed(records):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]

    assert untimed(resumed) == untimed(straight)


def test_lora_reference_is_the_model_with_adapters_off(tmp_path):
    """Adapters start at B = 0, so at step 1 the policy is its reference: every implicit reward is 0."""
    cfg = dpo_config(
        tmp_path,
        lora={"enabled": True, "r": 4, "alpha": 8},
        train={"steps": 4, "lr": 0.05},
    )
    cfg["rewards"] = [{"name": "helpers.reward_fns:length_ratio"}]  # words of several lengths: pairs at once
    records = launch(tmp_path, cfg)
    assert records[0]["dpo/pairs"] > 0 and records[0]["dpo/margin"] == 0.0 and records[0]["dpo/accuracy"] == 0.0
    assert abs(records[-1]["dpo/margin"]) > 1e-3  # the adapters moved the policy away from it


def test_two_ranks_train_like_one_process(tmp_path):
    """torchrun with two gloo ranks equals one process: FSDP (full fine-tuning), 3 prompts on 2 ranks
    (1 + 2 groups: unequal passes), pairs counted over both ranks, dpo.pairs=all, two optimizer
    steps per batch (grpo.num_iterations)."""
    cfg = dpo_config(
        tmp_path,
        run={"dtype": "float32"},
        sampler={"max_new_tokens": 3},
        grpo={"prompts_per_step": 3, "group_size": 4, "num_iterations": 2},
        train={"steps": 3, "lr": 0.01, "micro_batch_size": 4},
        dpo={"pairs": "all"},
        checkpoint={"save_final": True},
    )
    cfg["rewards"] = [{"name": "helpers.reward_fns:length_ratio"}]  # words of several lengths: pairs at once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same summation order in each matmul
    try:
        one = launch(tmp_path, {**cfg, "run": {**cfg["run"], "name": "one"}})
    finally:
        torch.set_num_threads(threads)
    two_cfg = {**cfg, "run": {**cfg["run"], "name": "two"}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two_cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, "-m", "minigrpo.train", "--config", str(path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-8000:]}"
    two = [json.loads(x) for x in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]

    def final(name):
        return load_file(tmp_path / "runs" / name / "checkpoints" / "step_000003" / "model.safetensors")

    start, a, b = load_file(tmp_path / "model" / "model.safetensors"), final("one"), final("two")
    assert max(float((a[k] - start[k]).abs().max()) for k in start) > 1e-3, "training did not move the weights"
    worst = max(float((a[k] - b[k]).abs().max()) for k in start)
    assert worst <= 1e-5, f"max |1 process - 2 ranks| = {worst:.3g}"
    assert sum(r["dpo/pairs"] for r in one) > 0
    for r1, r2 in zip(one, two, strict=True):
        for key in ("reward", "loss", "dpo/pairs", "dpo/ties", "dpo/accuracy", "dpo/margin", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5, nan_ok=True), f"step {r1['step']}: {key}"


def test_a_batch_without_ranked_groups_trains_on_nothing():
    """Every group tied: no row is kept, no pass runs, no gradient appears."""
    batch = make_batch(torch.ones(8), group_size=4)
    pairs = make_pairs(batch, 4, "best_worst")
    assert pairs.rollout.num_sequences == 0 and pairs.groups == [] and pairs.ties == 2
    model = tiny_model()
    opts = load_config(None).dpo
    parts, loss = pair_backward(model, pairs, torch.zeros(0), opts, size=4, temperature=1.0, num_pairs=0)
    assert parts == [] and loss == 0.0 and all(p.grad is None for p in model.parameters())
