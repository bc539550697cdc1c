"""Random rollouts for tests of the update: B prompts x G completions of fixed lengths, no padding."""

from __future__ import annotations

import torch

from minigrpo.sampling.rollout import Rollout


def full_rollout(B: int, G: int, Tp: int, Tc: int, vocab: int, generator: torch.Generator) -> Rollout:
    """B*G rows of Tp prompt and Tc completion tokens (ids in [3, vocab)), every token real, none
    truncated; rows [g*G, (g+1)*G) answer prompt g. Draws the prompt ids, then the completion ids."""
    N = B * G
    return Rollout(
        prompt_ids=torch.randint(3, vocab, (N, Tp), generator=generator),
        prompt_mask=torch.ones(N, Tp, dtype=torch.long),
        completion_ids=torch.randint(3, vocab, (N, Tc), generator=generator),
        completion_mask=torch.ones(N, Tc, dtype=torch.long),
        sampler_logp=torch.zeros(N, Tc),
        truncated=torch.zeros(N, dtype=torch.bool),
        completion_texts=[""] * N,
        prompt_index=torch.arange(B).repeat_interleave(G),
        group_size=G,
    )
