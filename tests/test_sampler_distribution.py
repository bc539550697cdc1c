"""The own sampler's draws, end to end (prefill, decode step, counter noise, filters), against the exact
distribution transformers' `generate(do_sample=True)` samples from: its warpers (temperature, top-k,
top-p, min-p in that order) on the model's own logits, then a softmax.

One prompt, thousands of rows of one group: each row draws with its own global id, so the first tokens
are independent draws from one distribution, and the rows that drew the same first token draw their
second from one distribution too (a decode step's logits, the noise at position 1). Seeds are fixed,
so the tests are deterministic; the chi-square bound is mean + 6 sd of its null distribution.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from test_sampler import CharTokenizer
from test_sampler_semantics import hf_filtered_probs

from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT = [1, 5, 9]
ROWS = 8000


def next_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's logits (1, V) fp32 for the token after `ids` (a full forward, no cache)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1:].float()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(chi2, dof) of drawn tokens (n,) against probs (V,): tokens expected >= 5 times each are their own
    cell, the rest of the kept tokens one cell; a token outside the support fails at once."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()  # (V,)
    kept = probs > 0
    assert counts[~kept].sum() == 0, f"drawn outside the filtered support: {(counts * ~kept).nonzero().flatten()}"
    expected = probs.double() * tokens.numel()  # (V,)
    big = expected >= 5
    cells_obs = torch.cat([counts[big], counts[kept & ~big].sum()[None]])
    cells_exp = torch.cat([expected[big], expected[kept & ~big].sum()[None]])
    if cells_exp[-1] < 5:  # the lumped cell too small: fold it into the largest one
        cells_obs[cells_exp[:-1].argmax()] += cells_obs[-1]
        cells_exp[cells_exp[:-1].argmax()] += cells_exp[-1]
        cells_obs, cells_exp = cells_obs[:-1], cells_exp[:-1]
    return float(((cells_obs - cells_exp) ** 2 / cells_exp).sum()), cells_exp.numel() - 1


def assert_fits(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    chi2, dof = chi_square(tokens, probs)
    assert dof >= 5, f"{what}: too few cells ({dof + 1}) to test anything"
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"{what}: chi2 {chi2:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize(
    "vocab,temperature,top_k,top_p,min_p",
    [
        (700, 0.3, 0, 0.8, 0.05),  # three race blocks, the filtered zeros inside them
        (128, 0.5, 20, 0.9, 0.0),  # one block; top-k then the nucleus of the survivors
        (128, 1.0, 0, 1.0, 0.1),  # min-p alone at temperature 1
    ],
)
def test_sampled_tokens_follow_the_filtered_softmax_end_to_end(vocab, temperature, top_k, top_p, min_p):
    """First and second tokens of ROWS rows against transformers' processed distribution (chi-square);
    the reported log-prob is the tempered softmax over the whole vocabulary (what the trainer computes),
    not the renormalised truncated one."""
    model = tiny_model(seed=11, vocab_size=vocab)
    params = SamplingParams(
        n=ROWS, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, max_new_tokens=2, ignore_stop=True
    )
    out = KVCacheSampler(model, CharTokenizer()).generate([PROMPT], params, key=(17, 2))
    first, second = out.completion_ids[:, 0], out.completion_ids[:, 1]  # (ROWS,) each

    logits = next_logits(model, PROMPT)  # (1, V)
    want = hf_filtered_probs(logits, temperature, top_k, top_p, min_p)[0]  # (V,)
    assert_fits(first, want, "first token")
    tempered = (logits[0] / temperature).log_softmax(-1)  # (V,) over the whole vocabulary
    assert (out.sampler_logp[:, 0] - tempered[first]).abs().max() < 1e-5
    truncated = want.log()[first]  # the renormalised filtered distribution's log-prob: not what is reported
    assert (out.sampler_logp[:, 0] - truncated).abs().min() > 1e-3

    mode = int(torch.bincount(first).argmax())  # the rows that drew the most common first token
    rows = first == mode
    logits = next_logits(model, [*PROMPT, mode])  # (1, V) of the decode step
    assert_fits(second[rows], hf_filtered_probs(logits, temperature, top_k, top_p, min_p)[0], "second token")
    tempered = (logits[0] / temperature).log_softmax(-1)  # (V,)
    assert (out.sampler_logp[rows, 1] - tempered[second[rows]]).abs().max() < 1e-5
