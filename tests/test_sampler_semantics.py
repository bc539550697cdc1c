"""What the own sampler generates, checked against transformers and the trainer on tiny random models
of each family: greedy equals `generate`, log-probs equal the trainer's, and bad settings or prompts
are refused with one-line errors before any decoding.

The transformers model is the oracle only: it builds and randomises each family's weights, saves
them, and its `generate` (greedy, several eos ids, a left-padded batch) gives the expected tokens.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from test_sampler import PROMPTS, CharTokenizer

from minigrpo.errors import UserError
from minigrpo.logprobs import completion_logprobs
from minigrpo.models.loading import load_pretrained
from minigrpo.sampling import kv_sampler
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import MIN_TEMPERATURE, RaceNoise, SamplingError, SamplingParams, sample_tokens

transformers = pytest.importorskip("transformers")

LOGP_TOL = 1e-5  # fp32: the sampler's cached decode against the trainer's full forward
VOCAB, CONTEXT = 97, 32  # max_position_embeddings: the tests decode past it
BASE = dict(
    hidden_act="silu",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", rope_theta=1e6, head_dim=24, tie_word_embeddings=True),
    "mistral-window": dict(model_type="mistral", rope_theta=10000.0, sliding_window=5),
    "phi3": dict(model_type="phi3", rope_theta=10000.0, num_key_value_heads=4),
}
SWITCH = 16  # original_max_position_embeddings of the longrope model: its factors switch past it
LONGROPE = dict(  # Phi-3.5 style: partial rotary (6 frequencies of 12), long factors past SWITCH
    model_type="phi3",
    rope_theta=10000.0,
    num_key_value_heads=4,
    partial_rotary_factor=0.75,
    original_max_position_embeddings=SWITCH,
    rope_scaling=dict(
        type="longrope", short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[1.5 + 0.3 * i for i in range(6)]
    ),
)
# one prompt of one token, one longer than the rest by far: the batch is mostly left padding
FAMILY_PROMPTS = [[7], [5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49], [60, 61, 62]]


class IdTokenizer:
    """Token ids written out as numbers; 0 pads."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)


def family_pair(family: str, tmp_path):
    """(transformers model, our model loaded from its saved weights), fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{**BASE, **(LONGROPE if family == "phi3-longrope" else FAMILIES[family])})
    torch.manual_seed(len(family))
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # peakier than the default init, so greedy paths are not flat
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(0, 0.15)
    hf.save_pretrained(tmp_path)
    ours, _ = load_pretrained(tmp_path, dtype=torch.float32)
    return hf, ours.eval()


def hf_greedy(hf, prompts: list[list[int]], max_new_tokens: int, eos: list[int]) -> list[list[int]]:
    """transformers' greedy completions of a left-padded batch, each cut after its first eos id."""
    Tp = max(map(len, prompts))
    ids = torch.zeros(len(prompts), Tp, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p) :], mask[i, Tp - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
        )
    rows = []
    for row in out[:, Tp:].tolist():
        ends = [t for t, tok in enumerate(row) if tok in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


def completions(out) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(out.completion_ids, out.completion_mask)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers_generate_with_several_eos_ids_past_the_context(family, tmp_path):
    """Prompts of 1, 12 and 3 tokens, 40 new tokens (the 12-token row ends past max_position_embeddings
    = 32); the eos ids are two tokens of the free greedy run, so rows end at different steps."""
    hf, ours = family_pair(family, tmp_path)
    free = KVCacheSampler(ours, IdTokenizer()).generate(
        FAMILY_PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=40, ignore_stop=True)
    )
    assert completions(free) == hf_greedy(hf, FAMILY_PROMPTS, 40, eos=[VOCAB + 1])  # no eos: all 40
    eos = [free.completion_ids[0, 9].item(), free.completion_ids[2, 4].item()]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=40, stop_ids=tuple(eos))
    out = KVCacheSampler(ours, IdTokenizer()).generate(FAMILY_PROMPTS, params)
    want = hf_greedy(hf, FAMILY_PROMPTS, 40, eos=eos)
    assert completions(out) == [row for row in want for _ in range(2)]  # both rows of a group, greedy
    assert out.truncated.tolist() == [len(r) == 40 and r[-1] not in eos for r in want for _ in range(2)]


def test_longrope_rows_stay_below_the_switch_and_equal_transformers_there(tmp_path):
    """A longrope model rotates a forward past original_max_position_embeddings by its long factors
    throughout (the trainer's forward), while the cache holds the prompt rotated by the short ones
    (transformers re-prefills at the switch): a call whose longest prompt (12) and max_new_tokens may
    pass SWITCH = 16 is refused, naming the setting, by generate and by a session; up to it the
    sampler equals transformers' greedy tokens and the trainer's log-probs."""
    hf, ours = family_pair("phi3-longrope", tmp_path)
    sampler = KVCacheSampler(ours, IdTokenizer())
    too_long = SamplingParams(temperature=0.0, max_new_tokens=5)
    refusal = r"^a prompt of 12 tokens .* original_max_position_embeddings=16,.* set max_new_tokens=4 or less"
    for target in (sampler, sampler.start_session()):
        with pytest.raises(SamplingError, match=refusal):
            target.generate(FAMILY_PROMPTS, too_long)
    out = sampler.generate(FAMILY_PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4, ignore_stop=True))
    assert completions(out) == hf_greedy(hf, FAMILY_PROMPTS, 4, eos=[VOCAB + 1])
    sampled = sampler.generate(FAMILY_PROMPTS, SamplingParams(n=2, max_new_tokens=4), key=(3,))
    with torch.no_grad():
        logp = completion_logprobs(ours, sampled.input_ids(), sampled.attention_mask(), sampled.completion_mask)
    assert (logp - sampled.sampler_logp).abs().max() < LOGP_TOL


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.0),
    dict(temperature=1e-3, top_k=1000),  # top_k past the vocabulary: no filter
    dict(temperature=3.0, top_k=5, min_p=0.05),
    dict(temperature=0.7, top_p=0.05),  # a tiny nucleus: the most likely token only
]


@pytest.mark.parametrize("family", ["llama", "phi3", "mistral-window"])
def test_sampler_logprobs_equal_the_trainers_for_each_family(family, tmp_path):
    """Rows of different lengths (stop ids), groups of 3, filters on and off: the trainer's chunked
    log-probs of the sampled tokens equal the sampler's (greedy: at temperature 1)."""
    _, model = family_pair(family, tmp_path)
    for kw in FILTERS:
        params = SamplingParams(n=3, max_new_tokens=20, stop_ids=(3, 8, 11, 14), **kw)
        out = KVCacheSampler(model, IdTokenizer()).generate(FAMILY_PROMPTS, params, key=(5, 1))
        with torch.no_grad():
            logp = completion_logprobs(
                model, out.input_ids(), out.attention_mask(), out.completion_mask, temperature=kw["temperature"] or 1.0
            )
        err = (logp - out.sampler_logp).abs().max().item()
        tol = LOGP_TOL / min(1.0, kw["temperature"] or 1.0)  # logits / T: their rounding grows by 1/T
        assert err < tol, f"{kw}: max |diff| {err:.2e}"
        if kw.get("top_p", 1.0) < 0.1 or kw["temperature"] < 1e-2:  # the most likely token each time
            groups = out.completion_ids.view(len(FAMILY_PROMPTS), 3, -1)  # (B, G, Tc)
            assert (groups == groups[:, :1]).all(), f"{kw}: the rows of a group differ"


def hf_filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The distribution transformers' `generate(do_sample=True)` draws from: its logits processors in
    its order (temperature, top-k, top-p, min-p), then a softmax. logits (B, V) -> probs (B, V) fp32."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    scores = logits.clone()
    for warp in warpers:
        scores = warp(None, scores)
    return scores.softmax(-1)


SETTINGS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 0.6, 0.1),  # min-p before top-p would shrink the nucleus to the first token
    (0.7, 0, 0.9, 0.05),
    (1.5, 40, 0.8, 0.02),
    (1.0, 5, 0.97, 0.3),
    (2.0, 200, 0.5, 0.0),  # top-k past the vocabulary
    (0.3, 1, 1.0, 0.0),
    (1.0, 0, 1e-6, 0.5),  # a tiny nucleus: the most likely token
    (50.0, 0, 0.99, 0.9),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SETTINGS)
def test_filters_apply_in_transformers_order(temperature, top_k, top_p, min_p, monkeypatch):
    """The probabilities the sampler races (top-k, top-p, min-p in transformers' order) equal, once
    normalised, those transformers samples from, to 1e-6, with the same tokens kept. Rows: the case
    where the order matters (p = .5, .3 and five of .04), then random peaky logits."""
    gen = torch.Generator().manual_seed(7)
    designed = torch.tensor([0.5, 0.3] + [0.04] * 5 + [0.0] * (VOCAB - 7)).clamp(min=1e-9).log()  # (V,)
    logits = torch.cat([designed[None] * temperature, 3 * torch.randn(15, VOCAB, generator=gen)])  # (16, V)
    raced = []
    monkeypatch.setattr(RaceNoise, "race", lambda self, probs: raced.append(probs) or probs.argmax(-1))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    noise = RaceNoise.make((0,), torch.arange(16))
    kv_sampler.sample_tokens(logits, params, noise=noise)
    ours = raced[0] / raced[0].sum(-1, keepdim=True)  # (16, V)
    want = hf_filtered_probs(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(ours > 0, want > 0), f"kept tokens differ in rows {((ours > 0) != (want > 0)).any(-1).nonzero()}"
    assert (ours - want).abs().max() < 1e-6


# ------------------------------------------------------------------------------ bad settings, bad prompts


@pytest.mark.parametrize(
    "settings,names",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=1e-40), "temperature"),  # logits / T overflow fp32: NaN log-probs
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(n=0), "n"),
        (dict(n=2.0), "n"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=8.0), "max_new_tokens"),
        (dict(stop_ids=2), "stop_ids"),
        (dict(stop_ids=(2, -1)), "stop_ids"),
        (dict(stop_ids=("</s>",)), "stop_ids"),
        (dict(stop_strings=("ok", "")), "stop_strings"),  # "" is in every text: every row would stop at once
        (dict(stop_strings=(3,)), "stop_strings"),
    ],
)
def test_bad_sampling_params_are_refused_naming_the_setting(settings, names):
    with pytest.raises(SamplingError, match=rf"^{names} must") as caught:
        SamplingParams(**settings)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


def test_stop_lists_are_stored_as_tuples_and_a_lone_string_is_one_stop_string():
    """A lone string is one stop string, not one per character; a list of stop ids works as a tuple."""
    model = tiny_model(seed=6)
    tok = CharTokenizer()
    free = KVCacheSampler(model, tok).generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=10, ignore_stop=True)
    )
    text = tok.decode(free.completion_ids[0].tolist())
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_strings=text[2] + "~~~~", stop_ids=[125, 126])
    assert params.stop_strings == (text[2] + "~~~~",) and params.stop_ids == (125, 126)
    out = KVCacheSampler(model, tok).generate([PROMPTS[0]], params)
    assert out.completion_texts[0] == text and out.truncated.all()  # the stop string never occurs


@pytest.mark.parametrize(
    "prompts,message",
    [
        ([[1, 5, 128]], r"prompt 0 has token id 128, outside the model's vocabulary \[0, 128\)"),
        ([[1, 5], [-3, 4]], r"prompt 1 has token id -3"),
        ([[1, 5], []], r"prompt 1 is empty"),
        ([], r"no prompts"),
        ([[1, 2.5]], r"prompt 0 must be a flat sequence of integer token ids"),
    ],
)
def test_prompts_the_model_cannot_read_are_refused_before_decoding(prompts, message):
    """An id outside the vocabulary is an index error on the CPU and a device-side assert (the process's
    CUDA context lost) on a GPU: refused up front, naming the prompt and the id; a session too."""
    sampler = KVCacheSampler(tiny_model(seed=1), CharTokenizer())
    for target in (sampler, sampler.start_session()):
        with pytest.raises(SamplingError, match=message):
            target.generate(prompts, SamplingParams(max_new_tokens=3))


def test_tiny_temperatures_draw_the_greedy_tokens_with_finite_log_probs():
    model = tiny_model(seed=4)
    greedy = KVCacheSampler(model, CharTokenizer()).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_stop=True)
    )
    for temperature, kw in ((1e-6, {}), (MIN_TEMPERATURE, {}), (MIN_TEMPERATURE, dict(top_k=3))):
        params = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, ignore_stop=True, **kw)
        out = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params)
        assert torch.equal(out.completion_ids, greedy.completion_ids.repeat_interleave(2, dim=0)), temperature
        assert torch.isfinite(out.sampler_logp).all() and (out.sampler_logp <= 0).all()


def test_a_sampler_without_tokenizer_returns_ids_and_refuses_stop_strings():
    """load_pretrained gives no tokenizer for a folder without tokenizer files: token ids still sample
    (texts empty); stop strings, which need the text, are refused before decoding."""
    sampler = KVCacheSampler(tiny_model(seed=2), None)
    out = sampler.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=4, stop_ids=(2,)))
    assert out.completion_texts == [""] * 6 and out.completion_ids.shape[0] == 6
    with pytest.raises(SamplingError, match=r"stop_strings .* need a tokenizer"):
        sampler.generate(PROMPTS, SamplingParams(max_new_tokens=4, stop_strings=("ab",)))


def test_numpy_and_fraction_settings_sample_as_their_python_values():
    """Settings from numpy (a float32 sweep) or fractions are stored as Python numbers: a numpy.float32
    temperature reached the Triton kernel as an argument it cannot convert (a crash on the GPU's fast
    path), and a Fraction divided no tensor on the filtered path."""
    import fractions

    import numpy as np

    logits = 2 * torch.randn(6, 300, generator=torch.Generator().manual_seed(3))  # (6, V)
    noise = RaceNoise.make((4, 1), torch.arange(6))
    params = SamplingParams(temperature=np.float32(0.75), top_k=np.int64(0), n=np.int64(2), max_new_tokens=np.int32(3))
    names = ("temperature", "top_p", "min_p", "top_k", "n", "max_new_tokens")
    assert [type(getattr(params, k)).__name__ for k in names] == ["float"] * 3 + ["int"] * 3
    want = sample_tokens(logits, SamplingParams(temperature=0.75), noise=noise, impl="triton")
    got = sample_tokens(logits, params, noise=noise, impl="triton")
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-6, rtol=0)
    filtered = SamplingParams(temperature=fractions.Fraction(3, 4), top_p=fractions.Fraction(9, 10))
    got = sample_tokens(logits, filtered, noise=noise)
    want = sample_tokens(logits, SamplingParams(temperature=0.75, top_p=0.9), noise=noise)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-6, rtol=0)
