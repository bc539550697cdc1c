"""What to sample (SamplingParams) and how tokens are drawn from logits (pure tensor functions).

Log-prob semantics, shared with the trainer: the log-prob of a sampled token is
`log_softmax(logits / temperature)[token]` in fp32, over the FULL vocabulary. top-k / top-p / min-p
only restrict which tokens may be drawn; they do not renormalise the reported log-prob, because the
trainer's policy is the tempered softmax and the two must agree. Greedy (temperature 0) reports
log-probs at temperature 1.

Drawing uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) picks token i with
probability p_i, with no host synchronisation (unlike torch.multinomial).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One rollout's sampling settings."""

    n: int = 1  # completions per prompt (the group size G)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with total probability >= top_p
    top_k: int = 0  # keep the k most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens with p < min_p * max p
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()  # a completion ends after any of these tokens (kept in it)
    stop_strings: tuple[str, ...] = ()  # ... or once its text contains one of these (kept in it)
    ignore_stop: bool = False  # always generate max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError(f"bad top_k={self.top_k} or min_p={self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[tokens] in fp32: logits (B, V), tokens (B,) -> (B,)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def filter_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Zero out tokens outside top-k / top-p / min-p (probs (B, V), not renormalised)."""
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p * sorted_p.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits (B, V) -> tokens (B,) int64, their log-probs (B,) fp32."""
    if params.greedy:
        tokens = logits.argmax(-1)
        return tokens, token_logprobs(logits, tokens, 1.0)
    logp = (logits.float() / params.temperature).log_softmax(-1)  # (B, V)
    probs = logp.exp()
    if params.filters:
        probs = filter_probs(probs, params.top_k, params.top_p, params.min_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    tokens = (probs / race).argmax(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
