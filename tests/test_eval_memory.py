"""`python -m minigrpo.eval`'s memory pre-flight (minigrpo/eval_memory.py) against a hand count, its
one-line refusal naming the settings that fit, and what the entry point checks before weights load
whatever the model source (a GGUF file or a hub model has no config.json to read prompts against)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.tiny import TINY_LLAMA, tiny_run_checkpoint, write_copy_task

from minigrpo import eval as evaluation
from minigrpo.config import ConfigError, load_config
from minigrpo.eval_memory import estimate_eval_peak, eval_preflight
from minigrpo.memory import MemoryPreflightError
from minigrpo.models.args import ModelArgs

ARGS = ModelArgs.from_hf_config(TINY_LLAMA)  # D=64, L=2, Hkv=2, Dh=16, F=128, V=128: 90432 parameters
WORKSPACES = 65 * 2**20
SAMPLED = ["run.dtype=bfloat16", "eval.temperature=1.0", "eval.samples_per_prompt=4", "eval.max_new_tokens=6"]


def test_estimate_against_a_hand_count():
    """bf16 (b=2), 3 prompts of Tp=10 x k=4 completions of Tc=6 (5 examples, --batch-size 3):
    weights 90432 x 2; KV slot 2 (k, v) x 2 layers x 2 heads x 16 x 2 = 256 bytes, prompts 3 x 10 and
    completions 12 x 6 slots; prefill 30 tokens x 2 (2D + max(3Dq + 3Dkv + D, 4F + D)) = 30 x 1408 and
    (3, 10, 10) scores x 3 bytes, above the decode's 12 x 128 x (2 + 5 x 4)."""
    cfg = load_config(None, SAMPLED)
    est = estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=3, num_examples=5)
    assert est.parts["weights"] == 180864
    assert est.parts["kv_cache"] == 3 * 10 * 256 + 12 * 6 * 256 == 26112
    assert est.parts["rollout_transient"] == 30 * 1408 + 300 * 3 == 43140 > 12 * 128 * 22
    assert est.total == 180864 + WORKSPACES + 26112 + 43140
    # sampler.max_rows=4: one prompt (its 4 rows) per wave; the finished waves' tokens and log-probs (12 bytes)
    waves = estimate_eval_peak(
        load_config(None, [*SAMPLED, "sampler.max_rows=4"]), ARGS, prompt_tokens=10, batch_size=3
    )
    assert waves.parts["kv_cache"] == 10 * 256 + 4 * 6 * 256
    assert waves.parts["rollout_transient"] == max(10 * 1408 + 100 * 3, 4 * 128 * 22 + 12 * 6 * 12)
    # more examples than --batch-size: the batch, not the split, is held; a short split caps the batch
    assert estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=3, num_examples=500).total == est.total
    assert estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=32, num_examples=3).total == est.total


def test_refusal_is_one_line_naming_each_setting_that_fits():
    """A budget of 68,400,000 bytes (72,000,000 free, 5% margin): --batch-size 2 fits (68,384,472), 3 does
    not (68,407,556); sampler.max_rows=6 (a prompt a wave), eval.max_new_tokens=3 (68,389,124 + 3072 Tc)
    and --samples-per-prompt 2 fit too, each alone."""
    cfg = load_config(None, SAMPLED)
    kw = dict(batch_size=3, num_examples=5, free_bytes=72_000_000)
    with pytest.raises(MemoryPreflightError) as e:
        eval_preflight(cfg, ARGS, "cuda", 10, **kw)
    message = str(e.value)
    assert "\n" not in message and message.startswith("evaluation is predicted to need 0.1 GiB at its peak (rollout:")
    assert message.endswith(
        "pass --batch-size 2 (0.1 GiB), or --set sampler.max_rows=6 (0.1 GiB), or --set eval.max_new_tokens=3 "
        "(0.1 GiB), or --samples-per-prompt 2 (0.1 GiB)"
    )
    for fix in (["sampler.max_rows=6"], ["eval.max_new_tokens=3"], ["eval.samples_per_prompt=2"]):
        eval_preflight(load_config(None, [*SAMPLED, *fix]), ARGS, "cuda", 10, **kw)  # each fits
    eval_preflight(cfg, ARGS, "cuda", 10, **{**kw, "batch_size": 2})
    with pytest.raises(MemoryPreflightError, match=r"--set eval.max_new_tokens=3 \(0.1 GiB\)"):
        eval_preflight(load_config(None, [*SAMPLED, "eval.max_new_tokens=4"]), ARGS, "cuda", 10, **kw)
    with pytest.raises(MemoryPreflightError, match=r": no single setting fits; combine a smaller --batch-size"):
        eval_preflight(cfg, ARGS, "cuda", 10, **{**kw, "free_bytes": 2**20})
    assert eval_preflight(cfg, ARGS, "cpu", 10, batch_size=3).total < 2**20 * 10  # CPU: nothing checked


def test_a_lora_checkpoint_counts_its_merge_and_an_nf4_base_its_adapters():
    """A LoRA checkpoint on a 16-bit base: the fp32 adapters (r x (in + out) per target and layer) and one
    adapted weight summed in fp32 while loading, gone once merged; on an NF4 base they stay for sampling."""
    lora = ["lora.enabled=true", "lora.r=4", "lora.targets=[q,v]"]
    cfg = load_config(None, [*SAMPLED, *lora])
    est = estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=3, adapter=True)
    adapters = 4 * 4 * ((64 + 64) + (64 + 32)) * 2
    assert est.parts["lora_adapters_to_merge"] == adapters and est.parts["lora_merge"] == 64 * 64 * 4
    assert est.phases["load"] == 180864 + adapters + 64 * 64 * 4 + WORKSPACES
    assert est.phases["rollout"] == 180864 + WORKSPACES + 26112 + 43140
    nf4 = estimate_eval_peak(load_config(None, [*SAMPLED, *lora, "lora.quantize_base=nf4"]), ARGS, prompt_tokens=10,
                             batch_size=3, adapter=True)  # fmt: skip
    assert nf4.parts["lora_adapters"] == adapters and "load" not in nf4.phases


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalmem")
    tiny_run_checkpoint(root / "ck", seed=1)
    write_copy_task(root / "rows.jsonl", n=6)
    return root


def common(task: Path, rows: str = "rows.jsonl") -> list[str]:
    return ["--split", "train", "--set", "run.device=cpu", "data.source=jsonl", f"data.path={task / rows}"]


def test_eval_refuses_on_cuda_before_the_weights_load(task, monkeypatch):
    """On a CUDA device too small for a batch (300 KiB above the workspaces; 6 rows of 200 tokens hold
    6 x 200 x 256 bytes of cache), the run stops with the pre-flight's line, naming the --batch-size
    that fits, before load_pretrained is ever called."""

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the memory pre-flight")

    monkeypatch.setattr(evaluation, "pick_device", lambda _: torch.device("cuda"))
    monkeypatch.setattr(evaluation, "load_pretrained", no_load)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int((WORKSPACES + 300 * 2**10) / 0.95), 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    with pytest.raises(MemoryPreflightError, match=r"^evaluation is predicted to need .* pass --batch-size \d+ "):
        evaluation._main(["--checkpoint", str(task / "ck"), *common(task), "eval.max_new_tokens=200"])


def test_gguf_prompts_are_checked_before_the_weights_load(task, tmp_path):
    """A GGUF file has no config.json: a prompt longer than the model's positions and a blank prompt
    used to be evaluated silently (RoPE past max_position_embeddings, a row with no question); now they
    are the same one-line errors as for a model folder."""
    from test_gguf_export import bpe_tokenizer, family_model

    from minigrpo import export

    gguf = export.save_gguf(
        family_model("llama", max_position_embeddings=32), bpe_tokenizer(), tmp_path / "t.gguf", "f16"
    )
    (tmp_path / "long.jsonl").write_text(json.dumps({"question": "x " * 40, "answer": "3"}) + "\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"question": "  ", "answer": "3"}) + "\n")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"question": "12 123", "answer": "3"}) + "\n")
    args = ["--checkpoint", str(gguf), "--split", "train", "--set", "run.device=cpu", "data.source=jsonl"]
    with pytest.raises(evaluation.UserError, match=r"more than the model's max_position_embeddings=32"):
        evaluation._main([*args, f"data.path={tmp_path / 'long.jsonl'}", "eval.max_new_tokens=4"])
    with pytest.raises(evaluation.UserError, match=r"^the prompt '  ' is empty"):
        evaluation._main([*args, f"data.path={tmp_path / 'blank.jsonl'}", "eval.max_new_tokens=4"])
    assert evaluation._main([*args, f"data.path={tmp_path / 'ok.jsonl'}", "eval.max_new_tokens=2"])["num_examples"] == 1


def test_a_hub_model_is_checked_once_loaded(task, monkeypatch):
    """A hub id is known only once fetched: its prompts are checked against the loaded model before
    anything generates (a prompt past its positions used to be generated from)."""
    monkeypatch.setattr(evaluation, "model_before_load", lambda source, tokenizer: (None, None))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("generated past the positions"))
    with pytest.raises(evaluation.UserError, match=r"more than the model's max_position_embeddings=256"):
        evaluation._main(["--checkpoint", str(task / "ck"), *common(task), "eval.max_new_tokens=300"])


def test_examples_without_a_reference_answer_are_refused(task):
    """A blank answer used to count as a wrong completion in accuracy (0.0) while the correctness
    reward left it unscored (NaN): one line naming the split, the count and the field now."""
    (task / "blank.jsonl").write_text(
        '{"question": "repeat 3", "answer": "3"}\n{"question": "repeat 4", "answer": " "}\n'
    )
    with pytest.raises(evaluation.UserError) as e:
        evaluation._main(["--checkpoint", str(task / "ck"), *common(task, "blank.jsonl")])
    assert str(e.value) == (
        "1 of the 2 examples of the 'train' split have no reference answer (the first: example 1, 'repeat 4'): "
        "accuracy needs one in data.answer_field='answer'"
    )


@pytest.mark.parametrize("seed", range(3))
def test_pass_at_k_is_the_unbiased_estimator_with_n_equal_k(seed):
    """pass@k = mean over examples of 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), here with n = k
    samples: any of the k right. maj@k against a plain vote count (answers here are distinct integers)."""
    gen = torch.Generator().manual_seed(seed)
    k, examples = 4, 7
    given = [str(int(v)) for v in torch.randint(0, 3, (examples * k,), generator=gen)]
    references = [str(int(v)) for v in torch.randint(0, 3, (examples,), generator=gen)]
    correct = [g == references[i // k] for i, g in enumerate(given)]
    unbiased = sum(1 - math.comb(k - sum(correct[e * k : (e + 1) * k]), k) / math.comb(k, k) for e in range(examples))
    votes = [given[e * k : (e + 1) * k] for e in range(examples)]
    winners = [max(dict.fromkeys(v), key=v.count) for v in votes]  # the first given of the most frequent
    majority = sum(w == r for w, r in zip(winners, references))
    metrics = evaluation.sample_metrics(correct, given, references, k)
    assert metrics == {f"pass@{k}": unbiased / examples, f"maj@{k}": majority / examples}


QV_ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("lora_on", [True, False], ids=["run-config", "bare-adapter"])
def test_a_checkpoint_adapting_q_and_v_is_estimated_as_q_and_v(lora_on):
    """A LoRA checkpoint adapting q and v only, evaluated with a config adapting all seven layers (or a bare
    adapter on the default config, LoRA off): its targets are the adapter's, so the pre-flight counts
    4 x r x ((64 + 64) + (64 + 32)) x 2 layers of fp32 adapters and a 64 x 64 merge, as a config naming
    [q, v]. The config's targets used to stand (12,032 more bytes of adapters), and with LoRA off none."""
    cfg = load_config(None, [*SAMPLED, *(["lora.enabled=true"] if lora_on else [])])
    evaluation.take_adapter_shape(cfg, QV_ADAPTER)
    assert cfg.lora.targets == ["q", "v"] and (cfg.lora.r, cfg.lora.alpha) == (4, 8.0)
    est = estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=3, adapter=True)
    named = load_config(None, [*SAMPLED, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.targets=[q,v]"])
    expected = estimate_eval_peak(named, ARGS, prompt_tokens=10, batch_size=3, adapter=True)
    adapters = 4 * 4 * ((64 + 64) + (64 + 32)) * 2
    assert est.parts["lora_adapters_to_merge"] == expected.parts["lora_adapters_to_merge"] == adapters == 7168
    assert est.phases == expected.phases and est.phases["load"] == 180864 + adapters + 64 * 64 * 4 + WORKSPACES


@pytest.mark.parametrize(
    "modules, fused",
    [
        (["q_proj", "v_proj"], False),
        (["model.layers.0.self_attn.v_proj", "self_attn.q_proj", "down_proj"], False),
        (["gate_proj", "up_proj", "o_proj", "k_proj"], False),
        (r".*\.(q|v)_proj", False),
        (r"model\.layers\.(1|3)\.mlp\.(up|down)_proj", False),
        (["qkv_proj", "down_proj"], True),
        (["gate_up_proj"], True),
        (r".*self_attn\.(qkv|o)_proj", True),
    ],
)
def test_target_modules_select_the_layers_peft_adapts(modules, fused):
    """target_modules -> lora.targets, against PEFT's own matching (check_target_module_exists) on the
    module names of a 4-block Llama (q_proj ...) or Phi-3 (fused qkv_proj, gate_up_proj): a config target
    is taken when PEFT adapts its module in some block."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from minigrpo.lora import TARGETS

    config = LoraConfig(target_modules=modules)
    peft_targets = [
        t
        for t, paths in TARGETS.items()
        if any(check_target_module_exists(config, f"model.layers.{i}.{paths[int(fused)]}") for i in range(4))
    ]
    assert evaluation.adapter_targets(modules) == peft_targets != []


def test_unknown_target_modules_are_one_line_naming_the_file():
    """all-linear is every target and no target_modules leaves the config's; a layer LoRA cannot adapt
    here (lm_head), a pattern matching none or a broken one, or another type are one AdapterError line."""
    where = Path("ck/adapter_config.json")
    assert evaluation.adapter_targets("all-linear") == ["q", "k", "v", "o", "gate", "up", "down"]
    assert evaluation.adapter_targets(None) is None
    cases = [
        (["q_proj", "lm_head"], "target_modules names 'lm_head', not a layer LoRA adapts here (q_proj, qkv_proj, "),
        (".*embed_tokens", "target_modules='.*embed_tokens' matches none of the layers LoRA adapts"),
        ("(q_proj", "target_modules='(q_proj' is not a regular expression (missing ), unterminated subpattern"),
        (7, "target_modules=7 must be a list of module names or a pattern"),
        ([], "target_modules=[] must be a list of module names or a pattern"),
    ]
    for modules, message in cases:
        with pytest.raises(evaluation.UserError) as e:
            evaluation.adapter_targets(modules, where)
        assert str(e.value).startswith(f"{where}: {message}") and "\n" not in str(e.value)
    cfg = load_config(None, ["lora.enabled=true"])
    with pytest.raises(evaluation.UserError, match=r"^adapter_config\.json: target_modules names 'lm_head'"):
        evaluation.take_adapter_shape(cfg, {**QV_ADAPTER, "target_modules": ["lm_head"]})


def test_a_q_v_adapter_evaluates_under_a_config_adapting_every_layer(task, tmp_path):
    """`--set lora.enabled=true` (every target by default) on a checkpoint adapting q and v: the base
    used to get adapters on all seven layers and the load to stop on "adapts 4 layers, the model 14"
    after the base had loaded; now the adapter's layers are the ones added, and the completions are
    those of the same adapter merged into a plain checkpoint."""
    from minigrpo.config import LoRACfg
    from minigrpo.lora import apply_lora, lora_layers
    from minigrpo.lora_export import save_merged, save_peft_adapter
    from minigrpo.models.loading import load_pretrained

    model, tokenizer = load_pretrained(task / "ck")
    apply_lora(model, LoRACfg(enabled=True, r=4, alpha=8.0, targets=["q", "v"]))
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():  # B = 0 at first: a large one changes the greedy tokens
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5, generator=gen)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(task / "ck"))
    save_merged(model, tokenizer, tmp_path / "merged", dtype=torch.float32)
    run = [*common(task), "eval.max_new_tokens=2", "data.eval_split=null"]
    adapted = evaluation._main(["--checkpoint", str(tmp_path / "adapter"), *run, "lora.enabled=true"])
    merged = evaluation._main(["--checkpoint", str(tmp_path / "merged"), *run])
    base = evaluation._main(["--checkpoint", str(task / "ck"), *run])
    texts = [[s["completion"] for s in r["samples"]] for r in (adapted, merged, base)]
    assert texts[0] == texts[1] != texts[2]


def test_a_greedy_evaluation_counts_no_filter_buffers():
    """eval.temperature=0 (the default) decodes greedily: the training config's sampler.top_k adds no
    sorted copy of the logits. 3 rows of V=128 in bf16, one-token prompts (prefill 3 x 1408 + 3 x 3 bytes):
    the decode step holds 3 x 128 x 22 bytes, and 12 more per logit when sampling at eval.temperature=1.
    The greedy estimate used to count them (13,056 bytes)."""
    filtered = ["run.dtype=bfloat16", "eval.max_new_tokens=6", "sampler.top_k=5"]
    est = estimate_eval_peak(load_config(None, filtered), ARGS, prompt_tokens=1, batch_size=3)
    assert est.parts["rollout_transient"] == 3 * 128 * 22 == 8448 > 3 * 1408 + 9
    sampled = load_config(None, [*filtered, "eval.temperature=1"])
    assert estimate_eval_peak(sampled, ARGS, prompt_tokens=1, batch_size=3).parts["rollout_transient"] == 3 * 128 * 34


def test_an_environment_run_is_told_the_episode_length_that_fits():
    """With env.kind the cache is sized by env.max_episode_tokens (not eval.max_new_tokens): the refusal
    names the longest episode budget that fits, never below a turn's sampler.max_new_tokens."""
    env = [*SAMPLED, "env.kind=tools", "env.tools=[calculator]", "sampler.max_new_tokens=8"]
    env.append("env.max_episode_tokens=400")
    cfg = load_config(None, env)

    def peak(tokens: int) -> int:
        c = load_config(None, [*env, f"env.max_episode_tokens={tokens}"])
        return estimate_eval_peak(c, ARGS, prompt_tokens=10, batch_size=3, num_examples=5).total

    free = int(peak(100) / 0.95) + 1  # 100 tokens fit the 5% margin, 400 do not
    assert peak(400) > free * 0.95 >= peak(100)
    with pytest.raises(MemoryPreflightError) as e:
        eval_preflight(cfg, ARGS, "cuda", 10, batch_size=3, num_examples=5, free_bytes=free)
    fits = int(str(e.value).split("--set env.max_episode_tokens=")[1].split()[0])
    assert 100 <= fits < 400 and peak(fits) <= int(free * 0.95) < peak(fits + 1)
    assert "eval.max_new_tokens" not in str(e.value)
    with pytest.raises(MemoryPreflightError, match=r"sampler.max_rows, env.max_episode_tokens and --samples"):
        eval_preflight(cfg, ARGS, "cuda", 10, batch_size=3, num_examples=5, free_bytes=2**20)


def test_a_vllm_run_is_told_a_max_rows_its_config_takes():
    """Evaluation samples with the own sampler whatever sampler.kind says, but a vLLM run's config refuses
    sampler.max_rows: the refusal named `--set sampler.max_rows=6`, which then failed to load. It names
    sampler.kind=own with it, and that override loads and fits."""
    vllm = [*SAMPLED, "sampler.kind=vllm"]
    kw = dict(batch_size=3, num_examples=5, free_bytes=72_000_000)
    with pytest.raises(MemoryPreflightError) as e:
        eval_preflight(load_config(None, vllm), ARGS, "cuda", 10, **kw)
    assert "or --set sampler.kind=own sampler.max_rows=6 (0.1 GiB), or" in str(e.value)
    eval_preflight(load_config(None, [*vllm, "sampler.kind=own", "sampler.max_rows=6"]), ARGS, "cuda", 10, **kw)
    with pytest.raises(ConfigError, match=r"sampler.max_rows=6 applies to the own sampler"):
        load_config(None, [*vllm, "sampler.max_rows=6"])


def _eval_with_reward_model(tmp_path, *overrides: str, **kwargs):
    """The SAMPLED evaluation config with a `reward_model` reward (a Qwen2.5-7B config.json) after its own."""
    from test_memory_rewards import _qwen7b_reward_model, _with_reward_model

    path = _qwen7b_reward_model(tmp_path / "rm7b")
    return _with_reward_model(load_config(None, [*SAMPLED, *overrides]), path=path, **kwargs)


def test_reward_models_count_in_the_rollouts_after_the_first_scoring_and_in_the_scoring(tmp_path):
    """eval.py scores every batch with the run's rewards: a bf16 7B reward model (device auto on CUDA) is
    held from the first batch's scoring on, so a later batch's rollout holds it (5 examples, --batch-size
    3), a lone batch's does not; the scoring phase holds it and one forward of its batch_size (8) of the
    batch's 3 x 4 rows of Tp + Tc = 16 tokens."""
    from minigrpo.memory_rewards import reward_model_weight_bytes, reward_scoring_bytes
    from minigrpo.models.presets import preset_config

    rm = ModelArgs.from_hf_config(preset_config("qwen2.5-7b"))
    weights, scoring = reward_model_weight_bytes(rm, 1, 2), reward_scoring_bytes(rm, 8, 10 + 6, 2)
    alone = estimate_eval_peak(load_config(None, SAMPLED), ARGS, prompt_tokens=10, batch_size=3, num_examples=5)
    cfg = _eval_with_reward_model(tmp_path)
    est = estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=3, num_examples=5)
    assert (est.parts["reward_models"], est.parts["reward_scoring"]) == (weights, scoring)
    assert est.phases["rollout"] == alone.phases["rollout"] + weights
    assert est.phases["scoring"] == 180864 + WORKSPACES + weights + scoring == est.total
    one_batch = estimate_eval_peak(cfg, ARGS, prompt_tokens=10, batch_size=3, num_examples=3)
    assert one_batch.phases["rollout"] == alone.phases["rollout"] and one_batch.total == est.total
    for phase, members in est.members.items():
        assert sum(est.parts[name] for name in members) == est.phases[phase], phase
    on_cpu = _eval_with_reward_model(tmp_path, device="cpu")  # not on the evaluated GPU
    assert estimate_eval_peak(on_cpu, ARGS, prompt_tokens=10, batch_size=3).total == alone.total
    elsewhere = _eval_with_reward_model(tmp_path, device="cuda:1")  # counted on GPU 1 only
    assert estimate_eval_peak(elsewhere, ARGS, prompt_tokens=10, batch_size=3, device_index=0).total == alone.total
    assert estimate_eval_peak(elsewhere, ARGS, prompt_tokens=10, batch_size=3, device_index=1).total == est.total


def test_an_evaluation_whose_reward_model_does_not_fit_is_refused_naming_its_settings(tmp_path):
    """A float32 7B reward model (26.3 GiB) on a GPU with 20 GiB free: refused before any weight loads,
    naming reward_models and the two settings that fit, bfloat16 weights and (last) the CPU."""
    cfg = _eval_with_reward_model(tmp_path, dtype="float32")
    index = len(cfg.rewards) - 1
    kw = dict(batch_size=3, num_examples=5, free_bytes=20 * 2**30)
    eval_preflight(load_config(None, SAMPLED), ARGS, "cuda", 10, **kw)  # fits without it
    with pytest.raises(MemoryPreflightError) as e:
        eval_preflight(cfg, ARGS, "cuda", 10, **kw)
    message = str(e.value)
    assert "\n" not in message and "at its peak (scoring: reward_models 26.3 GiB" in message, message
    assert message.endswith(
        f"pass --set rewards.{index}.kwargs.dtype=bfloat16 (13.3 GiB), or --set rewards.{index}.kwargs.device=cpu "
        "(0.1 GiB)"
    ), message
    eval_preflight(_eval_with_reward_model(tmp_path, dtype="bfloat16"), ARGS, "cuda", 10, **kw)
