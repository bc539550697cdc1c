"""VLLMSampler on configurations test_vllm_sampler.py does not build: another family (Qwen2: q/k/v
biases, a tied head) from a config.json whose `architectures` names another class, an engine shorter
than the default verification probe, a negative run seed, several stop ids; and the one-line error
when vLLM is not installed. Engine tests need vLLM (.venv/vllm) and skip without it."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from helpers.tiny import WORDS, tiny_model, tiny_tokenizer
from torch import nn

from minigrpo.config import Config
from minigrpo.errors import UserError
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.vllm_sampler import VLLMSampler
from minigrpo.sampling.vllm_sync import probe_that_fits

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (make test installs it into .venv/vllm)")
# the tiny helpers' config.json says "architectures": ["LlamaForCausalLM"] whatever model_type says
QWEN2 = dict(model_type="qwen2", hidden_size=128, num_attention_heads=4, vocab_size=len(WORDS))
QWEN2["tie_word_embeddings"] = True
SHORT = 24  # engine positions: fewer than the default probe (12 prompt ids + 16 greedy ones + 1 asked)
PROMPTS = [[1, 20, 5, 7], [1, 21, 9], [1, 22, 4, 4, 6, 8]]


def rows(rollout) -> list[list[int]]:
    return [ids[: int(n)] for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_mask.sum(-1))]


def adamw_step(model: nn.Module, lr: float = 1e-2) -> None:
    """One AdamW step on next-token cross-entropy of fixed random sequences."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.randint(3, len(WORDS), (4, 20), generator=torch.Generator().manual_seed(7))
    model.train()
    logits = model(ids[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    model.eval()


def test_without_vllm_the_sampler_names_the_extra_before_any_engine(monkeypatch):
    """No vllm package: one UserError naming the extra to install (was a bare ModuleNotFoundError)."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, find_spec says missing
    model = tiny_model(**QWEN2)
    with pytest.raises(UserError, match=r"needs the package vllm, which is not installed: pip install -e '\.\[vllm\]'"):
        VLLMSampler(model, None, max_model_len=64)
    with pytest.raises(UserError, match=r"pip install -e '\.\[vllm\]'"):
        VLLMSampler.from_config(Config(), model, None)


def test_the_probe_fits_any_engine_length():
    """The probe sequence holds at most max_model_len - 1 tokens (its request asks one more)."""
    prompt = list(range(3, 15))  # 12 ids
    assert probe_that_fits(prompt, 16, 256, 64) == (prompt, 16)
    assert probe_that_fits(prompt, 16, SHORT, 64) == (prompt, SHORT - 1 - 12)
    assert probe_that_fits(prompt, 16, 8, 64) == (prompt[:6], 1)
    assert probe_that_fits(prompt, 16, 13, 64) == (prompt[:11], 1)  # one greedy token kept


class Started(Exception):
    """Raised in place of starting a vLLM engine (engine_kwargs_seen)."""


def engine_kwargs_seen(monkeypatch) -> dict:
    """The arguments the next vllm.LLM(...) gets, which raises Started instead of starting an engine."""
    import vllm

    seen: dict = {}

    def fake_llm(**kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    return seen


@needs_vllm
def test_a_run_seed_outside_numpys_range_starts_the_engine(monkeypatch):
    """vLLM seeds numpy with its engine seed ([0, 2**32) only): run.seed=-1 raised inside the engine's
    start; the engine now gets the seed folded as the trainer folds it (build.seed_everything)."""
    import numpy as np

    seen = engine_kwargs_seen(monkeypatch)
    for seed in (-1, 2**40 + 5):
        with pytest.raises(Started):
            VLLMSampler(tiny_model(**QWEN2), None, max_model_len=64, seed=seed)
        assert seen["seed"] == seed % 2**32
        np.random.RandomState(seen["seed"])  # what vLLM's set_random_seed does with it: accepted


@pytest.fixture(scope="module")
def short_qwen2():
    """(sampler, model, tokenizer): a Qwen2 policy, an engine of SHORT positions, run seed -1."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model = tiny_model(seed=1, **QWEN2)
    tokenizer = tiny_tokenizer()
    sampler = VLLMSampler(model, tokenizer, max_model_len=SHORT, max_num_seqs=16, probe_every=1, seed=-1)
    yield sampler, model, tokenizer
    sampler.close()


@needs_vllm
def test_a_qwen2_policy_on_a_short_engine_syncs_after_a_step(short_qwen2):
    """vLLM picks its model class by config.json's `architectures`, the trainer its family by
    model_type: a qwen2 config naming LlamaForCausalLM built a Llama without q/k/v biases, and the
    first sync failed its probe (max |diff| 0.06). An engine shorter than the probe failed its first
    sync inside vLLM. Now: after an AdamW step, the probe passes, greedy tokens equal the own
    sampler's and sampled log-probs the trainer's (fp32, 5e-5)."""
    sampler, model, tokenizer = short_qwen2
    assert sampler.llm.llm_engine.model_config.architectures == ["Qwen2ForCausalLM"]
    assert len(sampler.probe_prompt) + sampler.probe_tokens == SHORT - 1
    adamw_step(model)
    sampler.sync(model)
    assert sampler.last_sync["probe_ran"] == 1.0 and sampler.last_sync["probe_diff_max"] < 1e-4
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    a, b = sampler.generate(PROMPTS, greedy), KVCacheSampler(model, tokenizer).generate(PROMPTS, greedy)
    assert rows(a) == rows(b)
    r = sampler.generate(PROMPTS, SamplingParams(n=4, temperature=0.7, max_new_tokens=12), key=(0, 1, 0))
    with torch.no_grad():
        logp = completion_logprobs(model, r.input_ids(), r.attention_mask(), r.completion_mask, temperature=0.7)
    diff = ((r.sampler_logp - logp) * r.completion_mask).abs().max()
    assert diff < 5e-5, f"sampler vs trainer log-probs at T=0.7: max |diff| {diff:.2e}"


@needs_vllm
def test_several_stop_ids_end_rows_where_the_own_sampler_ends_them(short_qwen2):
    """Stop ids as generation_config.json lists several (eos and end-of-turn): each row ends at the
    first of them, with the same tokens and truncated flags as the own sampler."""
    sampler, model, tokenizer = short_qwen2
    sampler.sync(model)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    free = rows(KVCacheSampler(model, tokenizer).generate(PROMPTS, greedy))
    stops = (free[0][2], free[1][4], 2)  # tokens the rows reach mid-way
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12, stop_ids=stops)
    a, b = sampler.generate(PROMPTS, params), KVCacheSampler(model, tokenizer).generate(PROMPTS, params)
    assert rows(a) == rows(b) and a.truncated.tolist() == b.truncated.tolist()
    assert len(rows(a)[0]) <= 3 and rows(a)[0][-1] in stops


@needs_vllm
def test_engine_dtype_by_name_and_bad_dtypes_or_probe_ids_are_refused_before_the_engine(monkeypatch):
    """dtype="bfloat16" failed with AttributeError ('str' has no 'itemsize') while sizing the KV
    cache; an integer dtype or a probe id outside the vocabulary reached vLLM. Now the name is taken
    and the others are one-line SamplingErrors before any engine."""
    from minigrpo.sampling.params import SamplingError

    seen = engine_kwargs_seen(monkeypatch)
    model = tiny_model(**QWEN2)
    with pytest.raises(Started):
        VLLMSampler(model, None, max_model_len=64, dtype="bfloat16")
    assert seen["dtype"] == "bfloat16" and seen["kv_cache_memory_bytes"] >= 64 * 2**20
    seen.clear()
    for bad in (torch.int8, "float64", "nonsense"):
        with pytest.raises(SamplingError, match=rf"dtype must be one of float32, bfloat16, float16 .*got {bad!r}"):
            VLLMSampler(model, None, max_model_len=64, dtype=bad)
    with pytest.raises(SamplingError, match=rf"probe_prompt \[1, {len(WORDS)}\] has ids outside the vocabulary"):
        VLLMSampler(model, None, max_model_len=64, probe_prompt=[1, len(WORDS)])
    assert not seen, "an engine was started"


@needs_vllm
def test_sliding_windows_on_some_layers_only_are_refused_before_the_engine(monkeypatch):
    """A Qwen2 model windowed from layer 1 on (max_window_layers=1 of 2): vLLM's Qwen2 model asserts
    all or none ("Sliding window for some but all layers is not supported") while the engine starts;
    now a one-line SamplingError before it. Windows on every layer start the engine."""
    from minigrpo.sampling.params import SamplingError

    engine_kwargs_seen(monkeypatch)
    windowed = dict(QWEN2, use_sliding_window=True, sliding_window=8)
    with pytest.raises(SamplingError, match=r"sliding window on some layers only \(windows per layer \[None, 8\]"):
        VLLMSampler(tiny_model(**windowed, max_window_layers=1), None, max_model_len=64)
    with pytest.raises(Started):
        VLLMSampler(tiny_model(**windowed, max_window_layers=0), None, max_model_len=64)


@needs_vllm
def test_syncing_another_model_is_refused_before_the_push_and_the_engine_stays_usable(short_qwen2):
    """A policy of another shape (a narrower MLP) made vLLM's in-place reload fail half-way with
    "start (0) + length (128) exceeds dimension size (64)", and every later sync of the right policy
    failed too (the engine's layers were left unusable). Now a SyncError naming the first tensor, with
    nothing pushed, as for a policy with a layer fewer; the next sync of the right policy works."""
    from minigrpo.sampling.vllm_sync import SyncError

    sampler, model, tokenizer = short_qwen2
    narrow = tiny_model(**QWEN2, intermediate_size=64)
    with pytest.raises(SyncError, match=r"^the policy is not the model the vLLM engine was built for \(other shape: "):
        sampler.sync(narrow)
    with pytest.raises(SyncError, match=r"other shape: model.layers.0.mlp.gate_proj.weight \(64, 128\) \(engine"):
        sampler.sync(narrow)
    with pytest.raises(SyncError, match=r"\(missing: model.layers.1.input_layernorm.weight and \d+ more\)$"):
        sampler.sync(tiny_model(**QWEN2, num_hidden_layers=1))
    sampler.sync(model)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert rows(sampler.generate(PROMPTS, greedy)) == rows(KVCacheSampler(model, tokenizer).generate(PROMPTS, greedy))


def refused_before_loading(tmp_path, monkeypatch, match: str, **model) -> None:
    """sampler.kind=vllm on the CPU over a local Qwen2 folder of QWEN2 with `model` on top: the run's checks
    refuse it with a SamplingError matching `match` before any weight loads (vLLM need not be installed)."""
    from helpers.runs import run_config
    from helpers.tiny import tiny_run_checkpoint

    from minigrpo import build
    from minigrpo.sampling.params import SamplingError

    cfg = run_config(tmp_path, sampler={"kind": "vllm", "temperature": 1.0, "max_new_tokens": 1})
    cfg["run"]["device"] = "cpu"
    config = {k: v for k, v in {**QWEN2, **model}.items() if k != "vocab_size"}  # the tokenizer sets it
    tiny_run_checkpoint(tmp_path / "model", **config)
    monkeypatch.setattr(build, "check_packages", lambda *a, **k: None)
    monkeypatch.setattr(build, "load_pretrained", lambda *a, **k: pytest.fail("the policy was loaded"))
    with pytest.raises(SamplingError, match=match):
        build.check_before_loading(Config.from_dict(cfg))


def test_partial_sliding_windows_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    """sampler.kind=vllm on a local Qwen2 folder windowed on some layers only: refused by the run's checks
    before any weight loads (the engine's own refusal came after the policy loaded)."""
    windowed = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    refused_before_loading(tmp_path, monkeypatch, r"sliding window on some layers only", **windowed)


def test_a_head_size_vllms_cpu_attention_cannot_serve_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    """vLLM's CPU attention serves head sizes 32, 64, 80, ...: a model of head size 16 started the engine,
    pushed the weights and failed at the first probe with "Unsupported CPU attention configuration:
    head_dim=16" (a long traceback, 30 s into the run); now one line before any weight loads."""
    from minigrpo.sampling.vllm_ranks import CPU_HEAD_SIZES

    if HAS_VLLM:  # the sizes of the installed vLLM's CPU attention
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES
    narrow_heads = dict(num_attention_heads=8, num_key_value_heads=8)  # 128 / 8 = 16 per head
    match = r"^the model's head size 16 is not one vLLM's CPU attention serves"
    refused_before_loading(tmp_path, monkeypatch, match, **narrow_heads)


def test_vllms_chat_template_warmup_failure_is_not_shown_its_other_warnings_are(caplog):
    """With skip_tokenizer_init vLLM's chat-template warmup fails on every engine start and logged a warning
    with a traceback that read as a failure of the run: that record is dropped, nothing else."""
    import logging

    from minigrpo.sampling.vllm_ranks import quiet_chat_template_warmup

    logger = logging.getLogger("vllm.renderers.base")
    quiet_chat_template_warmup()
    quiet_chat_template_warmup()  # once is enough, twice adds nothing
    assert len(logger.filters) >= 1
    with caplog.at_level(logging.WARNING, logger="vllm.renderers.base"):
        try:
            raise ValueError("Tokenizer not available when skip_tokenizer_init=True")
        except ValueError:
            logger.warning("Chat template warmup failed", exc_info=True)
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
