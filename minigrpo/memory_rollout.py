"""The own sampler's rollout memory, counted once for a training step (memory.py) and an evaluation
(eval_memory.py): B prompts x G completions each, decoded in waves of at most sampler.max_rows rows
(sampling/params.generation_waves: whole groups, or a group split across waves). b is the bytes of
the model dtype, V the vocabulary, Tp the prompt length, Tc a row's completion slots.

    waves      the largest wave decides: Bw prompts prefilled at once, Nw rows decoded at once
    kv_cache   Bw x Tp prompt slots, shared by the rows of each group, + Nw x Tc completion slots
               (memory_parts.kv_cache_bytes: slots x 2 (k, v) x layers x Hkv x Dh x b)
    prefill    Bw x Tp tokens through one block (memory_parts.forward_transient_per_token)
               + the (Bw, Tp, Tp) scores in b and their boolean mask: Bw x Tp x Tp x (1 + b)
    decode     Nw x V logits in b + the fused softmax / sampling / log-prob pass's 5 fp32 buffers per
               logit: Nw x V x (b + 20); with top-p / top-k / min-p and a temperature > 0, 12 bytes more
               per logit (sorted values, their order, the mask; greedy decoding takes the argmax
               unfiltered); with several waves the finished waves' tokens (int64) and log-probs (fp32)
               wait for the rest: B x G x Tc x 12
    transient  max(prefill, decode): the prefill's working memory is freed before decoding starts

Multi-turn episodes (env.kind): every row is its own prompt (B x G rows, groups of one), Tc the whole
episode (env.max_episode_tokens) and each turn at most `new_tokens`; the cache and prefill are
memory_parts.episode_rollout_bytes' (a session's slots kept between turns, or waves of whole histories).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigrpo.config import Config
from minigrpo.memory_parts import episode_rollout_bytes, forward_transient_per_token, kv_cache_bytes
from minigrpo.models.args import ModelArgs
from minigrpo.sampling.params import generation_waves

SAMPLING_FP32_BUFFERS = 5  # fp32 values per logit the fused softmax + sampling + log-prob pass holds
FILTER_BYTES = 12  # per logit, with top-p / top-k / min-p: the sorted values, their order, the mask
FINISHED_TOKEN_BYTES = 8 + 4  # per completion slot of a finished wave: its token (int64) and log-prob (fp32)


@dataclass(frozen=True)
class RolloutBytes:
    """The own sampler's rollout of one batch (module docstring)."""

    rows: int  # Nw: rows decoded at once (the largest wave)
    waves: int  # how many waves the batch is decoded in
    completion_len: int  # Tc: a row's completion slots
    kv_cache: int
    prefill: int
    decode: int

    @property
    def transient(self) -> int:
        """The working memory at the rollout's peak: the prefill's or the decode step's, never both."""
        return max(self.prefill, self.decode)


def completion_slots(cfg: Config, new_tokens: int) -> int:
    """Tc: `new_tokens` per row, or with env.kind a whole episode (env.max_episode_tokens)."""
    return cfg.env.max_episode_tokens if cfg.env.kind is not None else new_tokens


def rollout_bytes(
    cfg: Config,
    args: ModelArgs,
    *,
    prompts: int,
    group: int,
    prompt_len: int,
    new_tokens: int,
    temperature: float,
    b: int,
) -> RolloutBytes:
    """The KV cache and transients of `prompts` prompts x `group` completions of at most `new_tokens`
    tokens (a turn's, with env.kind) at `temperature` on the own sampler, for prompts of `prompt_len` tokens."""
    Tp, Tc, max_rows = prompt_len, completion_slots(cfg, new_tokens), cfg.sampler.max_rows
    N = prompts * group
    if cfg.env.kind is not None:  # every row is its own prompt
        waves = len(generation_waves(N, 1, max_rows))
        Nw, cache, prefill = episode_rollout_bytes(args, N, max_rows, Tp, Tc, new_tokens, b)
    else:
        spans = generation_waves(prompts, group, max_rows)
        waves = len(spans)
        Bw = max(p1 - p0 for p0, p1, _, _ in spans)  # prompts prefilled at once
        Nw = max((p1 - p0) * (c1 - c0) for p0, p1, c0, c1 in spans)  # rows decoded at once
        cache = kv_cache_bytes(args, Bw, Tp, b) + kv_cache_bytes(args, Nw, Tc, b)  # shared prompts + completions
        prefill = Bw * Tp * forward_transient_per_token(args, b) + Bw * Tp * Tp * (1 + b)  # + (Bw, Tp, Tp) scores, mask
    decode = _decode_bytes(cfg, Nw, args.vocab_size, temperature, b)
    decode += N * Tc * FINISHED_TOKEN_BYTES if waves > 1 else 0
    return RolloutBytes(rows=Nw, waves=waves, completion_len=Tc, kv_cache=cache, prefill=prefill, decode=decode)


def _decode_bytes(cfg: Config, rows: int, vocab: int, temperature: float, b: int) -> int:
    """One decode step's logits (rows, V) in b and the sampling pass's buffers over them."""
    per_logit = b + 4 * SAMPLING_FP32_BUFFERS + (FILTER_BYTES if sampling_filters(cfg, temperature) else 0)
    return rows * vocab * per_logit


def sampling_filters(cfg: Config, temperature: float) -> bool:
    """Whether sampling at `temperature` sorts or masks the probabilities (top-p, top-k or min-p), which
    takes FILTER_BYTES more; greedy decoding (temperature 0) takes the argmax of the logits unfiltered
    (sampling/params.sample_tokens)."""
    s = cfg.sampler
    return temperature > 0 and (s.top_p < 1.0 or s.top_k > 0 or s.min_p > 0)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free bytes, total bytes) of a CUDA device; free counts what torch reserves in this process."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device), total
