"""The distribution the own sampler draws from, against transformers' logits processors.

transformers (a test-only reference) gives the processed distribution of `generate(do_sample=True)`:
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper in that order on fp32
logits. The sampler must keep exactly the tokens they keep (ties and exact boundaries included),
draw with their probabilities, and report the log-prob of the tempered softmax over the whole
vocabulary (what the trainer computes, not the filtered distribution).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny import tiny_model
from test_sampler import PROMPTS, CharTokenizer
from test_sampler_semantics import hf_filtered_probs

from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import RaceNoise, SamplingParams, sample_tokens

transformers = pytest.importorskip("transformers")


def transformers_probs(logits: torch.Tensor, temperature: float, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """What `generate` samples from: logits (B, V) of any dtype, cast to fp32 as generate does, then
    its warpers in its order and a softmax -> (B, V) fp32."""
    return hf_filtered_probs(logits.float(), temperature, top_k, top_p, min_p)


def raced_probs(logits: torch.Tensor, params: SamplingParams, monkeypatch) -> torch.Tensor:
    """The probabilities sample_tokens races (B, V), normalised per row."""
    raced = []
    monkeypatch.setattr(RaceNoise, "race", lambda self, probs: raced.append(probs) or probs.argmax(-1))
    sample_tokens(logits, params, noise=RaceNoise.make((0,), torch.arange(logits.shape[0])))
    return raced[0] / raced[0].sum(-1, keepdim=True)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 0.9, 0.0), (0.7, 0, 0.95, 0.0), (1.0, 0, 0.5, 0.0), (1.2, 300, 0.8, 0.01), (0.6, 0, 0.85, 0.02)],
)
def test_top_p_keeps_transformers_tokens_among_bf16_ties(temperature, top_k, top_p, min_p, monkeypatch):
    """bf16 logits tie often (8 significant bits): the token at the nucleus' edge usually has equal
    twins, and which of them stay is transformers' choice (its ascending sort), not the first ids.
    Summing the mass from the top picked others in 44 of 64 rows at top_p .9 (the same mass kept)."""
    gen = torch.Generator().manual_seed(1)
    logits = (2.5 * torch.randn(64, 4000, generator=gen)).to(torch.bfloat16)  # (64, V)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = raced_probs(logits, params, monkeypatch)
    want = transformers_probs(logits, temperature, top_k, top_p, min_p)
    differ = ((ours > 0) != (want > 0)).any(-1)
    assert not differ.any(), f"kept tokens differ in {int(differ.sum())} of 64 rows"
    assert (ours - want).abs().max() < 1e-6


@pytest.mark.parametrize(
    "row,top_p,kept",
    [
        ([0.0] * 10, 0.3, 3),  # ten tokens of .1: three reach .3 exactly (a sum from the top said four)
        ([0.0] * 10, 0.35, 4),
        ([0.0] * 10, 0.7, 7),
        ([math.log(0.4), math.log(0.3), math.log(0.3), -math.inf], 0.5, 2),  # .4 and one of the tied .3
        ([1.0, 1.0, 1.0, 1.0, -math.inf], 0.5, 2),  # a masked token takes no part
    ],
)
def test_top_p_on_exact_boundaries_keeps_what_transformers_keeps(row, top_p, kept, monkeypatch):
    logits = torch.tensor([row])  # (1, V)
    ours = raced_probs(logits, SamplingParams(top_p=top_p), monkeypatch)
    want = transformers_probs(logits, 1.0, top_p=top_p)
    assert int((want > 0).sum()) == kept
    assert torch.equal(ours > 0, want > 0), f"ours {(ours > 0).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_filtered_draws_follow_the_processed_distribution(dtype):
    """Chi-square of 20,000 seeded draws from one row against transformers' processed distribution
    (dof = kept tokens - 1; bound: mean + 6 sd), no token outside it, and log-probs of the tempered
    softmax over the whole vocabulary, as the trainer computes them."""
    N, V, temperature = 20000, 64, 0.7
    gen = torch.Generator().manual_seed(5)
    logits = (2.0 * torch.randn(1, V, generator=gen)).to(dtype).expand(N, -1)  # (N, V)
    params = SamplingParams(temperature=temperature, top_k=40, top_p=0.95, min_p=0.01)
    tokens, logp = sample_tokens(logits, params, noise=RaceNoise.make((3, 1, 0), torch.arange(N)))
    want = transformers_probs(logits[:1], temperature, 40, 0.95, 0.01)[0].double()  # (V,)
    counts = torch.bincount(tokens, minlength=V).double()
    kept = want > 0
    assert counts[~kept].sum() == 0
    expected = want[kept] * N
    assert expected.min() > 5  # the chi-square approximation holds
    chi2, dof = float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi2 {chi2:.1f} with {dof} degrees of freedom"
    tempered = (logits[:1].float() / temperature).log_softmax(-1)[0]  # (V,)
    assert torch.allclose(logp, tempered[tokens], atol=1e-6, rtol=0)


def test_filtered_rows_draw_the_same_tokens_in_any_batch():
    """Split invariance with every filter on: a prompt alone (its rows' global ids) draws what it
    draws inside the batch."""
    model = tiny_model(seed=3)
    params = SamplingParams(n=3, max_new_tokens=4, ignore_stop=True, top_k=5, top_p=0.8, min_p=0.05)
    together = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS[:2], params, key=(0, 5, 0))
    alone = KVCacheSampler(model, CharTokenizer()).generate([PROMPTS[1]], params, key=(0, 5, 0), row_ids=range(3, 6))
    assert torch.equal(alone.completion_ids, together.completion_ids[3:6])
