"""A session of the own sampler: rows continued over several calls keep their KV cache.

    session = sampler.start_session(reserve=Tp + max_episode_tokens + max_new_tokens)  # or base.session_of
    out = session.generate(histories, params, key=(*key, turn), row_ids=ids)  # once per turn
    out = session.generate(some, params, key=(*key, turn), row_ids=some_ids, hold=other_ids)  # a split turn
    session.close()

Each call gives every row its whole sequence so far (the prompts `KVCacheSampler.generate` would
take). The session remembers which tokens each row's cache holds; the longest common prefix of those
and the new prompt stays cached and only the rest is prefilled (in an episode: the last model token
of the previous turn, which the decode loop draws but never feeds, and the environment's tokens).
The rows then decode as in `generate`, with the same noise (stream `key`, each row's global id,
token index from 0), so they draw the same tokens as a call that prefills everything.

A row held but not named in a call leaves the session, unless the call names it in `hold`: a turn
split into several calls (run_episodes near the model's position limit: minigrpo/episode_calls.py)
holds the rows of its other calls, whose caches then stay as they are, untouched by this call.

The cache layout. The decode loop writes one slot for all rows at each step, so rows share slot
columns; before each call they are laid out again, in place, row by row (the call's rows first, in
its order, then the held rows, each as it was):

    slots [0, H)          each row's kept tokens, right aligned (H: the most any row keeps)
          [H, H + P)      the new tokens, right aligned (P: the most any row adds), prefilled
          [H + P, ...)    the decode steps

A slot a row does not use is masked out of attention, and RoPE positions count each row's own
tokens, so the gaps change nothing: every token is rotated and attends to exactly the keys of a
left-padded prompt of the whole row. The relayout also drops the rows left out of the call and its
hold, the slots after a row's end (a turn that finished early keeps decoding padding until the batch
stops) and the tokens after a cut. Within a call, finished rows never leave the batch (no compaction):
their cache is needed for the next call.

A sliding window counts a row's real tokens, not its slots (models/transformer.py attention_mask_4d
and the decode kernel skip masked slots), so the gaps move no key out of a window either.

The gaps between a row's kept and new tokens (P minus what it adds) can make a call span more slots
than its longest row has tokens. Where that would not fit the cache, every row keeps a little less
instead, so that it adds exactly P tokens: no gaps, and a span of the longest row plus the decode
steps, at the price of prefilling a few kept tokens again. The cache is allocated at
`reserve` slots (run_episodes: the longest prompt + max_episode_tokens + max_new_tokens, what a
turn after the longest history can span) or what the first call needs, and regrows, copied once,
only when even that does not fit or the call and its held rows outnumber the cache's rows. Rows
that come in another order move in place (a cycle of moves goes through one spare row).

A sampler that decodes in waves (sampler.max_rows below the call's rows) prefills everything:
keeping every wave's cache between calls would hold the whole batch's, which max_rows is there to
avoid; for the same reason a call holds the rows of `hold` only up to max_rows rows in all. Rows
are never merged: G episodes of one prompt prefill that prompt G times on their first call, as
`run_episodes` without a session does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch

from minigrpo.distributed import full_weights
from minigrpo.lora import adapters_frozen
from minigrpo.models.kv_cache import KVCache
from minigrpo.models.transformer import Transformer

from .kv_sampler import DEFAULT_STREAM, KVCacheSampler, _DecodeState
from .params import SamplingError, SamplingParams
from .rollout import Rollout, left_pad

PREFILL_TOKENS = 16384  # tokens (rows x columns) per prefill forward at most: bounds its transient memory


def common_prefix(held: Sequence[int], prompt: Sequence[int]) -> int:
    """Leading tokens `held` and `prompt` share, at most len(prompt) - 1: a call prefills at least one
    token of every row (the first draw reads its logits)."""
    limit = min(len(held), len(prompt) - 1)
    if list(held[:limit]) == list(prompt[:limit]):
        return limit
    return next(i for i, (a, b) in enumerate(zip(held, prompt)) if a != b)


def move_order(sources: dict[int, int]) -> list[tuple[int | None, int | None]]:
    """An order for the in-place row moves `target <- sources[target]` (distinct sources) in which no
    row is written before every move reading it has run: steps (target, source), where (None, row)
    first saves `row` into a spare and a source None reads the spare back. A cycle of moves (rows
    trading places) needs the spare once; a chain needs none."""
    pending: dict[int, int | None] = dict(sources)
    steps: list[tuple[int | None, int | None]] = []
    while pending:
        read = {s for t, s in pending.items() if s != t}  # rows another move still reads
        ready = [t for t in pending if t not in read]
        if not ready:  # only cycles are left: save one row, its reader takes the spare
            saved = min(pending)
            steps.append((None, saved))
            pending[next(t for t, s in pending.items() if s == saved)] = None
            continue
        steps += [(t, pending.pop(t)) for t in ready]
    return steps


class KVSession:
    """Rows of the own sampler continued over calls (the SamplerSession of base.py; see the module
    docstring). `stats` sums over the calls: calls, prefill_tokens, reused_tokens, regrowths."""

    def __init__(self, sampler: KVCacheSampler, *, reserve: int = 0) -> None:
        self.sampler, self.reserve = sampler, reserve
        self.cache: KVCache | None = None  # k, v (L, R, Hkv, S, Dh): R >= the rows held
        self.row_ids: list[int] = []  # the rows held, in cache order (row i of the cache)
        self.held: list[list[int]] = []  # the tokens each row's cache holds, in order
        self.valid: torch.Tensor | None = None  # (len(row_ids), S) bool: the slots holding them
        self.parked: tuple[list[int], list[list[int]], torch.Tensor | None] = ([], [], None)  # during a call
        self.stats = {"calls": 0.0, "prefill_tokens": 0.0, "reused_tokens": 0.0, "regrowths": 0.0}

    def close(self) -> None:
        """Drop every row (the cache is freed)."""
        self.cache, self.valid, self.row_ids, self.held, self.parked = None, None, [], [], ([], [], None)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        key: Sequence[int] | None = None,
        row_ids: Sequence[int] | None = None,
        hold: Sequence[int] = (),
    ) -> Rollout:
        """As KVCacheSampler.generate with params.n == 1, prompt i being row row_ids[i]'s whole
        sequence so far; rows held but named neither here nor in `hold` leave the session (a row of
        `hold` keeps its cache for a later call; one the session does not hold is ignored). The
        rollout's stats add prefill_tokens (fed to the model) and reused_tokens (found in the cache)."""
        s = self.sampler
        s.check_call(prompt_ids, params)
        prompts = [[int(t) for t in p] for p in prompt_ids]
        ids = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
        holding = [int(r) for r in hold]
        if params.n != 1:
            raise SamplingError(f"a session continues rows one by one: params.n must be 1, got {params.n}")
        if len(ids) != len(prompts) or len(set(ids)) != len(ids):
            raise SamplingError(f"row_ids must be {len(prompts)} distinct ids, got {ids}")
        if len(set(holding)) != len(holding) or set(holding) & set(ids):
            raise SamplingError(f"hold must name distinct rows outside row_ids {ids}, got {holding}")
        if key is None:
            key, s.calls = (s.seed, DEFAULT_STREAM, s.calls), s.calls + 1
        self.stats["calls"] += 1
        if s.max_rows is not None and len(prompts) > s.max_rows:  # waves: see the module docstring
            self.close()
            out = s.generate(prompts, params, key=key, row_ids=ids)
            out.stats["reused_tokens"] = 0.0
            self.stats["prefill_tokens"] += out.stats["prefill_tokens"]
            return out
        with full_weights(s.model) as net, adapters_frozen(net, merge=s.merge_lora):  # net: the model unless sharded
            was_training = net.training
            s._net = net
            net.eval()
            try:
                return self._continue(net, prompts, params, tuple(key), ids, set(holding))
            except BaseException:
                self.close()  # a call that failed half-way leaves no cache to trust
                raise
            finally:
                net.train(was_training)
                s._net = None

    def _continue(
        self,
        net: Transformer,
        prompts: list[list[int]],
        params: SamplingParams,
        key: tuple[int, ...],
        ids: list[int],
        hold: set[int],
    ) -> Rollout:
        """Relayout, prefill the new tokens, decode with the sampler's loop; remember what is cached."""
        t0 = time.perf_counter()
        s, dev, n, Tc = self.sampler, net.device, len(prompts), params.max_new_tokens
        where = {r: i for i, r in enumerate(self.row_ids)}
        src = [where.get(r) for r in ids]  # the cache row holding each row of the call, or None
        parked = [i for i, r in enumerate(self.row_ids) if r in hold]  # cache rows held for a later call
        if s.max_rows is not None:  # the cache never holds more rows than the sampler decodes at once
            parked = parked[: max(0, s.max_rows - n)]
        keep = [0 if i is None else common_prefix(self.held[i], p) for i, p in zip(src, prompts)]
        H, P = max(keep), max(len(p) - k for p, k in zip(prompts, keep))
        room = max(self.reserve, 0 if self.cache is None else self.cache.max_len)
        if H + P + Tc > room:  # no gaps: every row adds P tokens
            keep = [max(0, len(p) - P) for p in prompts]  # (<= what it could keep)
            H = max(keep)
        cache = self._relayout(net, src, keep, H, H + P + Tc, parked)  # the call's rows: the first n
        new = [p[k:] for p, k in zip(prompts, keep)]
        block, block_mask = left_pad(new, s.pad_id)  # (n, P) each: the new tokens, right aligned
        kept = torch.tensor(keep)  # (n,)
        mask = torch.ones(n, H + P + Tc, dtype=torch.long)  # (n, H + P + Tc): history, new, decode slots
        mask[:, :H] = (torch.arange(H)[None, :] >= H - kept[:, None]).long()
        mask[:, H : H + P] = block_mask
        positions = kept[:, None] + (block_mask.cumsum(-1) - 1).clamp(min=0)  # (n, P): each row's own count
        mask, block, positions = mask.to(dev), block.to(dev), positions.to(dev)
        cols = max(1, PREFILL_TOKENS // n)
        for c0 in range(0, P, cols):  # column chunks: each writes its slots, attends to all before them
            c1 = min(P, c0 + cols)
            hidden = net.hidden(
                block[:, c0:c1],
                attention_mask=mask[:, : H + c1],
                position_ids=positions[:, c0:c1],
                kv_cache=cache,
                cache_position=torch.arange(H + c0, H + c1, device=dev),
            )  # (n, c1 - c0, D)
        logits = net.logits(hidden[:, -1])  # (n, V): every row's last new token is in the last slot
        t_prefill = time.perf_counter()
        rows = torch.tensor(ids, dtype=torch.long, device=dev)
        last_pos = positions[:, -1:].clone()  # (n, 1)
        st = _DecodeState.begin(cache, mask, last_pos, H + P - 1, key, rows, params, s.pad_id)
        s._draw(st, logits, params)  # token 0
        steps, loop = s._decode(st, H + P, params, compact_below=0.0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_decode = time.perf_counter()
        prompt_ids, prompt_mask = (t.to(dev) for t in left_pad(prompts, s.pad_id))
        rollout = s._finish(st, prompt_ids, prompt_mask, steps, params)
        self._remember(prompts, ids, rollout, mask[:, : H + P].bool(), steps)
        prefilled, reused = float(sum(len(x) for x in new)), float(sum(keep))
        self.stats["prefill_tokens"] += prefilled
        self.stats["reused_tokens"] += reused
        rollout.stats.update(
            prefill_s=t_prefill - t0,
            decode_s=t_decode - t_prefill,
            total_s=time.perf_counter() - t0,
            tokens=float(rollout.completion_mask.sum()),
            prefill_tokens=prefilled,
            reused_tokens=reused,
            decode_steps=float(steps),
            **loop,
        )
        return rollout

    def _relayout(
        self, net: Transformer, src: list[int | None], keep: list[int], H: int, width: int, parked: list[int]
    ) -> KVCache:
        """Row r < n of the call takes the first keep[r] tokens of cache row src[r], right aligned in
        slots [0, H) (every other slot is stale and masked); the held rows `parked` follow, at rows
        n.., each row whole. In place when the cache has the rows and >= `width` slots (a cycle of
        moves goes through one spare row), else into a new cache. Returns the call's view: its n rows."""
        n, old = len(src), self.cache
        R = n + len(parked)
        if old is not None and old.max_len >= width and old.k.shape[1] >= R:
            cache = old
        else:  # a held row keeps its slots where they are: the new cache spans them too
            span = int(self.valid[parked].any(0).nonzero().max()) + 1 if parked else 0
            cache = KVCache(net.args, R, max(width, self.reserve, span), dtype=net.dtype, device=net.device)
            self.stats["regrowths"] += float(old is not None)
        moves = {r: i for r, (i, k) in enumerate(zip(src, keep)) if k}  # target row <- cache row
        moves.update({n + j: i for j, i in enumerate(parked) if cache is not old or n + j != i})
        if moves:
            self._move_rows(old, cache, moves, n, keep, H)
        self.parked = (
            [self.row_ids[i] for i in parked],
            [self.held[i] for i in parked],
            self.valid[parked, : cache.max_len] if parked else None,
        )  # (what _remember appends after the call's rows)
        self.cache = cache
        call = copy.copy(cache)
        call.k, call.v = cache.k[:, :n], cache.v[:, :n]  # (L, n, Hkv, S, Dh) views
        return call

    def _move_rows(self, old: KVCache, cache: KVCache, moves: dict[int, int], n: int, keep: list[int], H: int):
        """Run `moves` (target row <- old cache row): a call's row r < n gathers its first keep[r]
        tokens into slots [H - keep[r], H), a held row (r >= n) copies its slots as they are. From
        `old` into `cache` in order, or in place (move_order) when they are the same cache."""
        held_first = torch.sort((~self.valid).to(torch.int8), dim=1, stable=True).indices  # (n_old, S)
        steps = move_order(moves) if cache is old else list(moves.items())
        spare_k = spare_v = None
        for target, i in steps:
            k_row = old.k[:, i] if i is not None else spare_k  # (L, Hkv, S_old, Dh)
            v_row = old.v[:, i] if i is not None else spare_v
            if target is None:  # a cycle: this row is read after it is written
                spare_k, spare_v = k_row.clone(), v_row.clone()
                continue
            source = moves[target] if i is None else i  # the row whose tokens these are
            if target < n:
                slots = held_first[source, : keep[target]]  # (k,) the slots of the row's first k tokens, in order
                cache.k[:, target, :, H - len(slots) : H] = k_row.index_select(2, slots)  # (L, Hkv, k, Dh), a copy
                cache.v[:, target, :, H - len(slots) : H] = v_row.index_select(2, slots)
            else:
                S = min(cache.max_len, old.max_len)
                cache.k[:, target, :, :S] = k_row[:, :, :S]
                cache.v[:, target, :, :S] = v_row[:, :, :S]

    def _remember(
        self, prompts: list[list[int]], ids: list[int], rollout: Rollout, before: torch.Tensor, steps: int
    ) -> None:
        """After a call each row holds its prompt and its completion but the last token (drawn, never
        fed): before (n, H + P) marks the slots of the prompts, the decode steps follow them. The held
        rows of the call's `hold` come after, as they were."""
        n, width = before.shape
        lengths = rollout.completion_mask.sum(-1)  # (n,)
        valid = torch.zeros(n, self.cache.max_len, dtype=torch.bool, device=before.device)  # (n, S)
        valid[:, :width] = before
        valid[:, width : width + steps] = torch.arange(steps, device=before.device)[None, :] < (lengths - 1)[:, None]
        completions = rollout.completion_ids.tolist()
        held_ids, held_tokens, held_valid = self.parked
        self.held = [p + c[: m - 1] for p, c, m in zip(prompts, completions, lengths.tolist())] + held_tokens
        self.row_ids = ids + held_ids
        if held_valid is not None:
            pad = torch.zeros(len(held_ids), self.cache.max_len, dtype=torch.bool, device=before.device)
            pad[:, : held_valid.shape[1]] = held_valid.to(before.device)
            valid = torch.cat([valid, pad])
        self.valid, self.parked = valid, ([], [], None)
