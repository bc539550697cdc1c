"""The sampler contract: what the training loop calls on a sampler, and nothing else.

Two samplers implement it: `KVCacheSampler` (kv_sampler.py: the trainer's own `Transformer` over
a KV cache; no second copy of the weights) and `VLLMSampler` (vllm_sampler.py: a colocated vLLM
engine holding its own copy, pushed by `sync`). The loop calls every member on either, unchanged:

    rollout = sampler.generate(prompt_ids, params, key=(seed, step, round), row_ids=range(lo * G, hi * G))
    sampler.sleep()         # before the training phase: free device memory
    sampler.sync(policy)    # after the optimizer step (wakes the sampler); then read sampler.last_sync
    sampler.close()         # at the end of the run

Noise: `key` names a noise stream (ints, e.g. (seed, step, round)) and `row_ids` gives the global
id of each of the N = B * params.n rows (default 0..N-1; the rows of prompt b are b*n .. b*n+n-1).
A row's tokens are a function of (weights, prompt, key, its id) only, so a step splits over ranks,
waves or micro-batches without changing what is drawn, and a resumed run redraws the same tokens.
The own sampler implements this exactly (counter-based noise, params.RaceNoise). vLLM cannot take
counters: it sends each row as its own request seeded from (key, row id) (`row_seed`), which gives
the same property up to vLLM's batch-dependent numerics. key=None: the sampler's own stream.

Rows that continue (the turns of multi-turn episodes): a sampler may offer sessions
(`ContinuingSampler.start_session`). A `SamplerSession` takes the same calls as `generate`, each
prompt being its row's whole sequence so far, and keeps every row's KV cache between calls, so a
call prefills only what follows the part of the row it already holds (a turn: the environment's
tokens); a row id left out of a call leaves the session, unless the call names it in `hold` (the
other part of a turn split near the position limit: its cache stays). The tokens drawn are the same as
`generate`'s. `session_of` gives a session where the sampler has them and the sampler itself
elsewhere (vLLM: its prefix cache already reuses the history).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .params import SamplingError, SamplingParams, stream_key
from .rollout import Rollout


@runtime_checkable
class Sampler(Protocol):
    """What the training loop needs of a sampler (see the module docstring)."""

    last_sync: dict[str, float]  # statistics of the last sync (timings, sizes, probe); empty if it copies nothing

    @property
    def pad_id(self) -> int:
        """The token id that pads prompts (left) and completions (right) in a Rollout."""
        ...

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        *,
        key: tuple[int, ...] | None = None,
        row_ids: Sequence[int] | None = None,
    ) -> Rollout:
        """Sample `params.n` completions for each of the B prompts (token ids) -> Rollout of N = B*n
        rows, groups contiguous; key / row_ids name each row's noise (see the module docstring)."""
        ...

    def sync(self, policy: nn.Module) -> None:
        """Make the sampler sample `policy`'s current weights (raise if it cannot prove it does)."""
        ...

    def sleep(self) -> None:
        """Free device memory for the training phase (a no-op where there is nothing to free)."""
        ...

    def wake(self) -> None:
        """Undo `sleep` where that needs no new weights (generate and sync wake the sampler anyway)."""
        ...

    def close(self) -> None:
        """Release what the sampler holds (engine, memory); the sampler is unusable afterwards."""
        ...


@runtime_checkable
class SamplerSession(Protocol):
    """Rows continued over several calls, each keeping its KV cache (see the module docstring)."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        *,
        key: tuple[int, ...] | None = None,
        row_ids: Sequence[int] | None = None,
        hold: Sequence[int] = (),
    ) -> Rollout:
        """As Sampler.generate with params.n == 1: prompt i is row row_ids[i]'s whole sequence so far;
        the rows in `hold` keep their caches through a call that leaves them out."""
        ...

    def close(self) -> None:
        """Free every row's cache."""
        ...


@runtime_checkable
class ContinuingSampler(Protocol):
    """A sampler that offers sessions."""

    def start_session(self, *, reserve: int = 0) -> SamplerSession:
        """A new session; reserve: cache slots per row worth allocating at once (0: as needed)."""
        ...


@contextmanager
def session_of(sampler: Sampler, *, reserve: int = 0, reuse: bool = True) -> Iterator[Sampler | SamplerSession]:
    """What to call `generate` on for rows that continue: a session of `sampler` (closed on exit)
    where it offers one and `reuse` is on, else the sampler itself (every call prefills its prompts)."""
    if not (reuse and isinstance(sampler, ContinuingSampler)):
        yield sampler
        return
    session = sampler.start_session(reserve=reserve)
    try:
        yield session
    finally:
        session.close()


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """What every sampler takes: each prompt a non-empty sequence of integer token ids in [0, vocab_size);
    else a SamplingError naming the prompt (its index in the call) and what is wrong with it."""
    if len(prompts) == 0:
        raise SamplingError("no prompts given: every call samples at least one prompt")
    for i, prompt in enumerate(prompts):
        ids = prompt_tensor(i, prompt)  # (Tp_i,)
        if ids.numel() == 0:
            raise SamplingError(f"prompt {i} is empty: every prompt needs at least one token")
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise SamplingError(f"prompt {i} must be a flat sequence of integer token ids, got {prompt!r:.80}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise SamplingError(f"prompt {i} has token id {bad}, outside the model's vocabulary [0, {vocab_size})")


def prompt_tensor(i: int, prompt) -> torch.Tensor:
    """Prompt i as a tensor of its ids, or a SamplingError for what is no sequence of numbers: text (not yet
    encoded), one id (a flat list given for a list of prompts), None or a string among the ids, an id past int64."""
    if isinstance(prompt, (str, bytes)):
        raise SamplingError(f"prompt {i} is text, {prompt!r:.60}: a sampler takes token ids (tokenizer.encode)")
    try:
        return torch.as_tensor(prompt if isinstance(prompt, torch.Tensor) else list(prompt))
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise SamplingError(
            f"prompt {i} must be a sequence of integer token ids, got {prompt!r:.80} "
            "(prompt_ids is a list of prompts, each a list of token ids)"
        ) from None


def row_seed(key: Sequence[int], row_id: int) -> int:
    """A 63-bit seed for one row of the stream `key`: how a seeded-per-request sampler (vLLM)
    names a row's randomness by (key, row id), like the counter-based noise does."""
    k0, k1 = stream_key(*key, row_id)
    return ((k1 << 32) | k0) & (2**63 - 1)


__all__ = ["ContinuingSampler", "Sampler", "SamplerSession", "check_prompts", "row_seed", "session_of"]
