"""The own sampler: the trainer's `Transformer` decoding over a pre-allocated KV cache.

No second copy of the weights exists, so there is nothing to sync: the sampler always samples the
current policy. One `generate` call:

1. prefill the B distinct prompts once (left padded to Tp); their keys/values stay where the
   prefill wrote them, shared by the G rows of each group (models/transformer.py SharedPrefix): N =
   B*G rows share one prefill and one copy of the prompt cache, and each row owns only Tc slots;
2. draw the first token of every row from the prefill logits;
3. decode one token per step for all N rows. Each step is a fixed sequence of device operations
   on static buffers (token in, cache write, attention over the first `kv_len` slots, sampling,
   bookkeeping), so on CUDA it is captured once per `kv_len` bucket as a CUDA graph and replayed;
   the host only looks at the device every `check_every` steps (all rows finished? stop strings?).

Rows that finished keep running until the next host check (the batch is static between checks) but
write padding, and are masked out. At a check, once at most `compact_below` of the decoding rows are
still live, the finished rows leave the batch: the live rows' cache moves down in place, their
inputs and noise keys into smaller buffers (and the graphs are captured anew), so a long-tailed
rollout stops paying for the rows that stopped early. The rollout is as wide as its longest
completion, whatever the bucket size, check cadence or compaction.

Nothing inside a captured step may wait for the host: no data-dependent shapes. That is why stop
tokens are found by comparing with every stop id (`is_stop`) rather than with `torch.isin`, which
switches to a sort + unique algorithm (a host sync) once the stop ids outnumber about 10 * n^0.145
of the n rows - e.g. after a compaction leaves few rows, or a tokenizer with many stop ids.

Rows that continue over calls (the turns of multi-turn episodes) go through a session
(`start_session`, kv_session.py): it keeps every row's cache between calls, prefills only what a
row adds, and runs this module's decode loop (without compaction) on the cache it holds.

Tokens are drawn with counter-based noise (params.RaceNoise): row i of a call is identified by a
stream key (the trainer passes (seed, step, round)) and its global row id, so a row samples the
same tokens whichever batch, micro-batch or rank generates it. On a model sharded with FSDP2 the
weights are gathered once for the whole call (distributed.full_weights) and decoding runs on the
full weights, so the decode loop itself never communicates.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from minigrpo.distributed import full_weights
from minigrpo.lora import adapters_frozen
from minigrpo.models.kv_cache import KVCache, SharedPrefix
from minigrpo.models.transformer import Transformer

from .base import check_prompts
from .decode_graphs import DecodeGraphs
from .params import RaceNoise, SamplingError, SamplingParams, generation_waves, sample_tokens
from .rollout import Rollout, concat_rollouts, left_pad, stop_string_cut, stop_string_seen

if TYPE_CHECKING:
    from .kv_session import KVSession

DEFAULT_STREAM = -1  # key word of calls that bring no key: (seed, DEFAULT_STREAM, call number)
COMPACT_ROWS = 32  # cache rows moved per copy when finished rows leave the batch (the copy's buffer)


@dataclass
class _DecodeState:
    """Static buffers of one decode loop (their addresses never change: CUDA graphs replay them).

    n is the number of rows still in the batch (N until the first compaction); `rows` names them
    in the outputs, which always have all N rows, and `call_rows` in the whole generate call (what
    the logits processor is told: a wave's rows are not the call's first ones)."""

    cache: KVCache
    mask: torch.Tensor  # (n, Tp + Tc) long: prompt padding 0, everything else 1
    tok: torch.Tensor  # (n, 1) last token
    pos: torch.Tensor  # (n, 1) its RoPE position
    done: torch.Tensor  # (n,) bool
    rows: torch.Tensor  # (n,) long: the row of out_tok / out_logp each decoding row writes
    call_rows: torch.Tensor  # (n,) long: each decoding row's index among the call's rows (0..N_call-1)
    noise: RaceNoise  # row keys (n,) and the drawn position, which is `step` itself
    slot: torch.Tensor  # (1,) the cache slot of `tok`
    step: torch.Tensor  # (1,) index of the token being drawn
    out_tok: torch.Tensor  # (N, Tc) long, pad-filled
    out_logp: torch.Tensor  # (N, Tc) fp32
    stop_ids: torch.Tensor  # (S,) long
    pad: torch.Tensor  # () long

    def keep_rows(self, keep: torch.Tensor, filled: int) -> None:
        """Shrink the batch to the decoding rows `keep` (n',) ascending, in place: the cache rows move
        down to [0, n') (slots below `filled`: no slot past them was ever written) a few rows at a
        time, so the rollout's memory never grows; the small per-row buffers are replaced (graphs
        that replay the old ones must go)."""
        self.cache.keep_rows(keep, filled, COMPACT_ROWS)
        self.mask, self.tok, self.pos = self.mask[keep], self.tok[keep], self.pos[keep]
        self.done, self.rows, self.call_rows = self.done[keep], self.rows[keep], self.call_rows[keep]
        self.noise = replace(self.noise, row_keys=self.noise.row_keys[keep])

    @classmethod
    def begin(
        cls,
        cache: KVCache,
        mask: torch.Tensor,
        last_pos: torch.Tensor,
        last_slot: int,
        key: tuple[int, ...],
        rows: torch.Tensor,
        params: SamplingParams,
        pad_id: int,
        call_rows: torch.Tensor | None = None,
    ) -> _DecodeState:
        """The buffers of a loop over `cache`, whose slots up to `last_slot` hold the prompts: mask
        (n, last_slot + 1 + Tc), last_pos (n, 1) the RoPE position of each row's last prompt token,
        rows (n,) the rows' global ids (their noise), call_rows (n,) their indices among the call's
        rows (default 0..n-1: the loop decodes the whole call), on the cache's device."""
        n, dev, Tc = rows.shape[0], rows.device, params.max_new_tokens
        step = torch.zeros(1, dtype=torch.long, device=dev)
        stop = () if params.ignore_stop else params.stop_ids
        return cls(
            cache=cache,
            mask=mask,
            tok=torch.zeros(n, 1, dtype=torch.long, device=dev),
            pos=last_pos,  # advanced to the first completion token by the first draw
            done=torch.zeros(n, dtype=torch.bool, device=dev),
            rows=torch.arange(n, device=dev),
            call_rows=torch.arange(n, device=dev) if call_rows is None else call_rows.to(dev),
            noise=RaceNoise.make(key, rows, position=step),  # (n,) row keys; t is the step buffer
            slot=torch.full((1,), last_slot, dtype=torch.long, device=dev),
            step=step,
            out_tok=torch.full((n, Tc), pad_id, dtype=torch.long, device=dev),
            out_logp=torch.zeros(n, Tc, dtype=torch.float32, device=dev),
            stop_ids=torch.tensor(sorted(set(stop)), dtype=torch.long, device=dev),
            pad=torch.tensor(pad_id, dtype=torch.long, device=dev),
        )


def rope_switch(args) -> tuple[int, str] | None:
    """The length past which a forward rotates EVERY position by other frequencies (args: ModelArgs), and
    the setting that names it: a longrope model's long factors, a dynamic NTK model's larger base; None
    for RoPE whose frequencies never change (positions past the context are rotated as transformers does)."""
    if args.rope_type == "longrope":
        switch = int(args.rope_params["original_max_position_embeddings"])
        where = "where its longrope scaling switches to the long factors"
        return switch, f"original_max_position_embeddings={switch}, {where}"
    if args.rope_type == "dynamic":
        limit = int(args.max_position_embeddings)
        return limit, f"max_position_embeddings={limit}, past which its dynamic NTK scaling rotates every position anew"
    return None


def check_rope_switch(prompts: Sequence[Sequence[int]], params: SamplingParams, args) -> None:
    """Refuse rows that may pass the model's `rope_switch`: the trainer's forward of such a row rotates every
    token by the new frequencies, the cache holds the prompt rotated by the old ones, and the log-probs
    part (by nats for longrope, by 0.19 in a tiny dynamic NTK model; prompt_fit.position_limit)."""
    switch, longest = rope_switch(args), max(map(len, prompts))
    if switch is not None and longest + params.max_new_tokens > switch[0]:
        raise SamplingError(
            f"a prompt of {longest} tokens and max_new_tokens={params.max_new_tokens} pass the model's {switch[1]} "
            f"(the KV cache cannot follow): set max_new_tokens={max(switch[0] - longest, 0)} or less, or shorten it"
        )


def is_stop(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """tokens (...) -> bool (...): which are stop ids (S,). One broadcast compare, safe to capture in
    a CUDA graph (torch.isin may sort and sync with the host)."""
    return (tokens[..., None] == stop_ids).any(-1)


class KVCacheSampler:
    """Samples completions from `model` itself (the `Sampler` protocol of base.py).

    The weights are the policy's own, so `sync` only checks that it is given that same model, and
    sleep / wake / close have nothing to free (no-ops); `last_sync` stays empty.

    Args:
        cuda_graphs: capture the decode step as CUDA graphs (CUDA only).
        kv_bucket: decode steps attend over the first `kv_len` cache slots, rounded up to a multiple
            of this (one CUDA graph per bucket; smaller buckets waste less attention on empty slots).
        check_every: decode steps between host checks for finished rows and stop strings (None: 32
            on CUDA, where each check synchronises with the device, 1 elsewhere). Only the time of
            the early exit depends on it, never a token.
        seed: the noise stream of calls that pass no `key` (the k-th such call uses (seed, -1, k)).
        max_rows: rows decoded at once (waves; see generation_waves), None: all.
        compact_below: at a host check, drop the finished rows from the batch once the live ones
            are at most this share of it (0: never). Rows are independent, so no token changes.
        logits_processor: f(logits (n, V), rows (n,), step (1,)) -> logits, applied before each
            draw: `rows` are the decoding rows' ids in the call (0..N-1, whichever wave decodes
            them), `step` the index of the token being drawn (device tensors: it runs inside the
            CUDA graphs, so no host syncs). The log-probs are those of the processed logits, which
            the trainer does not apply: a processor that changes probabilities parts the two.
        prefix_per_group: decode attention reads each prompt's keys and values once for its group
            of rows (kernels/prefix_attention.py); False: once per row (the same attention).
        merge_lora: LoRA adapters merged into a 16-bit copy of each adapted weight for each call
            (lora.adapters_frozen): one GEMM per projection, one more copy of those weights; False:
            the adapters run unmerged (their casts made once per call).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        cuda_graphs: bool = True,
        kv_bucket: int = 256,
        check_every: int | None = None,
        seed: int = 0,
        max_rows: int | None = None,
        compact_below: float = 0.5,
        logits_processor: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        prefix_per_group: bool = True,
        merge_lora: bool = True,
    ) -> None:
        if kv_bucket < 1 or (check_every is not None and check_every < 1):
            raise SamplingError(f"kv_bucket and check_every must be >= 1, got {kv_bucket} and {check_every}")
        if max_rows is not None and max_rows < 1:
            raise SamplingError(f"max_rows must be >= 1 (None: every row at once), got {max_rows}")
        if not 0 <= compact_below < 1:
            raise SamplingError(f"compact_below must be in [0, 1), got {compact_below}")
        self.compact_below = compact_below
        self.prefix_per_group = prefix_per_group
        self.merge_lora = merge_lora
        self.logits_processor = logits_processor
        self.model = model
        self.max_rows = max_rows
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self.kv_bucket = kv_bucket
        self.check_every = check_every
        self.seed = seed
        self.calls = 0  # generate() calls without a key so far
        self.last_sync: dict[str, float] = {}  # nothing is ever copied
        self._net: Transformer | None = None  # what decodes during a call: the model, or its gathered view

    def sync(self, policy: Transformer) -> None:
        """The sampler runs the policy's own weights: there is nothing to copy."""
        if policy is not self.model:
            raise ValueError("the own sampler samples the model it was built with; pass that same model")

    def sleep(self) -> None:
        """Nothing to free: the KV cache lives only during generate()."""

    def wake(self) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        """Nothing to release."""

    def start_session(self, *, reserve: int = 0) -> KVSession:
        """A KVSession (kv_session.py): rows that continue over several calls (multi-turn episodes)
        keep their KV cache between them. reserve: slots per row to allocate at once (run_episodes:
        what a turn after the longest history can span), so the cache need not regrow."""
        from .kv_session import KVSession  # it drives this module's decode loop

        return KVSession(self, reserve=reserve)

    def check_call(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """Refuse, before any work, what the model or the tokenizer cannot take: an empty prompt, an id
        outside the model's vocabulary (an index error on CPU, a device-side assert on CUDA), stop
        strings without a tokenizer to read the text."""
        check_prompts(prompts, self.model.args.vocab_size)
        if params.stop_strings and not params.ignore_stop and self.tokenizer is None:
            raise SamplingError(f"stop_strings {params.stop_strings} need a tokenizer: this sampler has none")
        check_rope_switch(prompts, params, self.model.args)

    def decode(self, tokens: list[int], *, skip_special_tokens: bool) -> str:
        """The text of `tokens` ('' for a sampler built without a tokenizer: token ids only)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        key: Sequence[int] | None = None,
        row_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> Rollout:
        """Sample `params.n` completions for each prompt (token ids) -> Rollout of N = B*n rows.

        key: the noise stream (ints, e.g. (seed, step, round)); None: (seed, -1, k) for the k-th
            such call of this sampler.
        row_ids: (N,) global ids of the rows (default 0..N-1): the rows of prompt b are
            b*n .. b*n + n - 1 of this call, and a row's tokens depend only on (key, its id).
        """
        prompts = prompt_ids
        B = len(prompts)
        self.check_call(prompts, params)
        N = B * params.n
        rows = torch.arange(N) if row_ids is None else torch.as_tensor(row_ids, dtype=torch.long).flatten()
        if rows.shape != (N,):
            raise SamplingError(f"row_ids has {rows.numel()} ids for {N} rows ({B} prompts x n={params.n})")
        if key is None:  # (after the checks: a refused call takes no stream)
            key, self.calls = (self.seed, DEFAULT_STREAM, self.calls), self.calls + 1
        n, waves = params.n, generation_waves(B, params.n, self.max_rows)
        parts = []
        with full_weights(self.model) as net, adapters_frozen(net, merge=self.merge_lora):  # net: the model
            # itself unless it is sharded (FSDP2); LoRA: adapters merged into a copy for the rollout
            if net is self.model:  # q, k, v (gate, up) side by side: one GEMM each (a gathered view: as is)
                net.pack_projections()
            self._net = net
            try:
                for p0, p1, c0, c1 in waves:  # split invariance: a wave's rows draw what they would in one go
                    ids = (torch.arange(p0, p1)[:, None] * n + torch.arange(c0, c1)[None, :]).flatten()
                    wave = replace(params, n=c1 - c0)
                    parts.append(self._generate(prompts[p0:p1], wave, tuple(key), rows[ids], ids))
            finally:
                self._net = None
        if len(parts) == 1:
            return parts[0]
        joined = concat_rollouts(parts, self.pad_id)  # rows in their order; groups may span waves
        device = joined.prompt_ids.device
        return replace(joined, prompt_index=torch.arange(N, device=device) // n, group_size=n)

    def _generate(
        self, prompts, params: SamplingParams, key: tuple[int, ...], rows: torch.Tensor, call_rows: torch.Tensor
    ) -> Rollout:
        """One wave: rows (n,) its rows' global ids (noise), call_rows (n,) their indices in the call."""
        t0 = time.perf_counter()
        model, dev = self._net, self._net.device
        was_training = model.training
        model.eval()
        try:
            prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)  # (B, Tp) each
            prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
            Tp = prompt_ids.shape[1]

            state, first_logits = self._prefill(prompt_ids, prompt_mask, params, key, rows.to(dev), call_rows)
            t_prefill = time.perf_counter()
            self._draw(state, first_logits, params)  # token 0
            steps, loop = self._decode(state, Tp, params)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_decode = time.perf_counter()
            rollout = self._finish(state, prompt_ids, prompt_mask, steps, params)
        finally:
            model.train(was_training)
        generated = int(rollout.completion_mask.sum())
        rollout.stats.update(
            prefill_s=t_prefill - t0,
            decode_s=t_decode - t_prefill,
            total_s=time.perf_counter() - t0,
            tokens=float(generated),
            prefill_tokens=float(prompt_mask.sum()),  # the distinct prompts' tokens
            decode_steps=float(steps),
            **loop,
        )
        return rollout

    # ------------------------------------------------------------------------------------------

    def _prefill(
        self,
        prompt_ids,
        prompt_mask,
        params: SamplingParams,
        key: tuple[int, ...],
        rows: torch.Tensor,
        call_rows: torch.Tensor | None = None,
    ) -> tuple[_DecodeState, torch.Tensor]:
        model, dev, (B, Tp) = self._net, self._net.device, prompt_ids.shape
        G, Tc = params.n, params.max_new_tokens
        N = B * G
        small = KVCache(model.args, B, Tp, dtype=model.dtype, device=dev)
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, Tp)
        hidden = model.hidden(
            prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            kv_cache=small,
            cache_position=torch.arange(Tp, device=dev),
        )
        logits = model.logits(hidden[:, -1])  # (B, V)
        group = torch.arange(B, device=dev).repeat_interleave(G)  # (N,) the prompt of each row
        listed = G if self.prefix_per_group else None  # the G rows of a prompt share its keys/values
        prefix = SharedPrefix(small.k, small.v, group, max_rows=listed)
        cache = KVCache(model.args, N, Tp + Tc, dtype=model.dtype, device=dev, prefix=prefix)  # (.., Tc, ..)
        mask = torch.ones(N, Tp + Tc, dtype=torch.long, device=dev)
        mask[:, :Tp] = prompt_mask.repeat_interleave(G, dim=0)
        last_pos = positions[:, -1:].repeat_interleave(G, dim=0)  # (N, 1)
        state = _DecodeState.begin(cache, mask, last_pos, Tp - 1, key, rows, params, self.pad_id, call_rows)
        return state, logits.repeat_interleave(G, dim=0)  # (N, V)

    def _draw(self, st: _DecodeState, logits: torch.Tensor, params: SamplingParams) -> None:
        """Sample from logits (n, V), record the token, then advance the static inputs by one."""
        if self.logits_processor is not None:
            logits = self.logits_processor(logits, st.call_rows, st.step)
        tok, logp = sample_tokens(logits, params, noise=st.noise)
        tok = torch.where(st.done, st.pad, tok)
        at = st.rows * st.out_tok.shape[1] + st.step  # (n,) this token's place in the flattened outputs
        st.out_tok.view(-1).index_copy_(0, at, tok)  # (index_put_ with two index tensors fails in capture)
        st.out_logp.view(-1).index_copy_(0, at, logp.masked_fill(st.done, 0.0))
        st.done |= is_stop(tok, st.stop_ids)
        st.tok.copy_(tok[:, None])
        st.pos += 1
        st.slot += 1
        st.step += 1

    def _step(self, st: _DecodeState, kv_len: int, params: SamplingParams) -> None:
        """One decode step: feed the last token at its slot, attend over slots [0, kv_len), draw."""
        net = self._net
        hidden = net.hidden(
            st.tok, attention_mask=st.mask[:, :kv_len], position_ids=st.pos, kv_cache=st.cache, cache_position=st.slot
        )
        self._draw(st, net.logits(hidden[:, -1]), params)  # (n, V) model dtype: the draw reads it once

    def _decode(
        self, st: _DecodeState, Tp: int, params: SamplingParams, compact_below: float | None = None
    ) -> tuple[int, dict[str, float]]:
        """Run decode steps until every row is done or max_new_tokens; Tp: the slots before the first
        completion token. compact_below: the sampler's unless given (a KVSession passes 0: its rows
        keep their cache for the next turn).

        Returns the tokens drawn per row and the loop's counts for the rollout's stats: compactions
        (finished rows leaving `st`), CUDA graphs captured and the host seconds their captures took
        (recording a step; the first also runs one for real). The GPU keeps working through the steps
        queued before a capture while the host records it."""
        compact_below = self.compact_below if compact_below is None else compact_below
        Tc, total = params.max_new_tokens, st.mask.shape[1]
        graphs = DecodeGraphs() if self.cuda_graphs and st.tok.is_cuda else None
        check_every = self.check_every or (32 if st.tok.is_cuda else 1)
        drawn, compactions = 1, 0
        for s in range(1, Tc):
            if (s - 1) % check_every == 0 and not params.ignore_stop:
                if self._stop_strings_hit(st, s, params):
                    break
                live = (~st.done).nonzero().flatten()  # (n_live,) one host sync
                if len(live) == 0:
                    break
                if len(live) <= compact_below * len(st.rows):
                    if graphs is not None:
                        graphs.reset()  # they replay the buffers that keep_rows replaces
                    st.keep_rows(live, Tp + s - 1)  # slots [0, Tp + s - 1) are filled
                    compactions += 1
            kv_len = min(total, -(-(Tp + s) // self.kv_bucket) * self.kv_bucket)
            if graphs is None:
                self._step(st, kv_len, params)
            else:
                graphs.run(kv_len, functools.partial(self._step, st, kv_len, params))
            drawn = s + 1
        captures, capture_s = (0, 0.0) if graphs is None else (graphs.captures, graphs.capture_s)
        return drawn, dict(compactions=float(compactions), graph_captures=float(captures), capture_s=capture_s)

    def _stop_strings_hit(self, st: _DecodeState, s: int, params: SamplingParams) -> bool:
        """Mark rows whose text already contains a stop string as done; True if all rows are done."""
        if not params.stop_strings:
            return False
        open_rows = (~st.done).nonzero().flatten().tolist()
        tokens = st.out_tok[st.rows[open_rows], :s].tolist()
        for row, toks in zip(open_rows, tokens):  # (stop_strings need a tokenizer: checked up front)
            if stop_string_seen(self.tokenizer, toks, params.stop_strings):  # never on half a character
                st.done[row] = True
        return bool(st.done.all())

    def _finish(self, st: _DecodeState, prompt_ids, prompt_mask, steps: int, params: SamplingParams) -> Rollout:
        G = params.n
        out_tok = st.out_tok[:, :steps]  # (N, steps)
        N = out_tok.shape[0]
        stops = is_stop(out_tok, st.stop_ids)  # (N, steps)
        hit = stops.any(-1)
        lengths = torch.where(hit, stops.int().argmax(-1) + 1, steps).tolist()  # stop token kept
        truncated = (~hit).tolist()
        rows = out_tok.tolist()
        texts = []
        for i in range(N):
            toks = rows[i][: lengths[i]]
            if params.stop_strings and not params.ignore_stop:
                cut = stop_string_cut(self.tokenizer, toks, params.stop_strings)
                if cut is not None:
                    lengths[i], truncated[i], toks = cut, False, toks[:cut]
            texts.append(self.decode(toks, skip_special_tokens=True))
        Tc = max(lengths)  # steps past the longest completion (between host checks) are dropped
        out_tok, out_logp = st.out_tok[:, :Tc], st.out_logp[:, :Tc]  # (N, Tc)
        dev = out_tok.device
        length_t = torch.tensor(lengths, device=dev)
        completion_mask = (torch.arange(Tc, device=dev)[None, :] < length_t[:, None]).long()  # (N, Tc)
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(G, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(G, dim=0),
            completion_ids=out_tok.masked_fill(completion_mask == 0, self.pad_id),
            completion_mask=completion_mask,
            sampler_logp=out_logp * completion_mask,
            truncated=torch.tensor(truncated, dtype=torch.bool, device=dev),
            completion_texts=texts,
            prompt_index=torch.arange(N // G, device=dev).repeat_interleave(G),
            group_size=G,
        )
