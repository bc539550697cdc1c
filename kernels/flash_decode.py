"""Split-K ("flash-decoding") attention for one query per row over a pre-allocated KV cache.

    decode_attention(q (B, H, Dh), k_cache, v_cache (B, Hkv, S_max, Dh), key_mask (B, >= kv_len),
                     slot (1,) int64 device tensor, kv_len: int, *, window=None, scale=None,
                     prefix=None, rows=None, impl="auto") -> out (B, H, Dh) in q.dtype

Query head h reads kv head h // G, G = H / Hkv (GQA). Slot j of row b is attended iff
    j <= slot  and  key_mask[b, j] != 0  and  (window is None or j >= window_start[b]),
or j == slot: the query's own slot is always attended, so no row is ever fully masked (exactly
`attention_mask_4d` of models/transformer.py). The window counts real tokens, not slots (pads
inside a row do not push real keys out of it): window_start[b] is the slot of the `window`-th last
real key of row b up to the query (0 if fewer), computed on the device per call from the key mask
and the slot (decode_ref.py: the reference, the spec and the input checks). Slots past `slot`
(the future, up to kv_len) may hold anything: they are never read into the result. Softmax in fp32,
one rounding to q.dtype at the end; scale defaults to Dh^-0.5 (SDPA's).

Shared prefix: `prefix = (k_prefix, v_prefix (P, Hkv, Tp, Dh), group (B,) int64)` says that the first
Tp slots of row b are row group[b] of the prefix, and k_cache / v_cache hold only the slots after
them (slot j >= Tp of row b is column j - Tp of the cache). GRPO samples G completions of each
prompt: the G rows of a group share their prompt's keys and values, stored once (a G-fold smaller
prompt cache) and, since the rows of a group run side by side, mostly read from L2 once. With
`rows` (which rows share each prefix row) the prefix part is computed once per group instead
(prefix_attention.py: the G rows' queries as one tensor-core tile) into the first split records,
the split kernel below covers only the rows' own slots, and the combine step merges both. When the
own slots take one split, the split kernel merges the prefix's records itself (no own records, no
combine launch); when they take several, the prefix part runs beside them on a second CUDA stream.

Why split-K: in decode each step reads the whole live cache, and one program per (row, kv head)
leaves most SMs idle when B * Hkv is small (64 rows x 2 kv heads = 128 programs on 132 SMs). Here
the slots of each (row, kv head) are cut into SPLITS chunks of SPLIT slots that run in parallel:

1. grid (B, Hkv, SPLITS): program (b, g, s) holds the G query heads of kv head g as a [G_PAD, Dh]
   tile (G_PAD >= 16 for tl.dot; padded rows are zero and never stored) and streams slots
   [s*SPLIT, min((s+1)*SPLIT, kv_len, slot+1)) in tiles of BLOCK_S: scores = q @ k^T * scale (fp32),
   masked, online softmax (running max m, sum l, unnormalised acc [G_PAD, Dh] fp32); with a prefix
   a tile's addresses are selected slot by slot from the prefix or the row's own cache (one load,
   as vectorised as without). It writes (acc, m, l) per (b, h, s) to an fp32 workspace; a split
   wholly past `slot` writes m = -1e30, l = 0, acc = 0. With one split there is nothing to
   combine: it writes acc / l to out directly (in a cascade, after merging the prefix's records).
2. grid (B, H): combine, out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s with M = max m_s.
   Empty splits weigh exp(-1e30 - M) = 0 (a finite "minus infinity": no inf - inf NaN).

Dots: bf16/fp16 tiles go to tensor cores with fp32 accumulation, p rounded to the cache dtype for
p @ v (as flash attention does); fp32 inputs use full-precision fp32 dots (not tf32). Under the CPU
interpreter every dot runs on fp32 copies (Triton 3.6's interpreter multiplies bf16 tiles as raw
16-bit integers); bf16 products are exact in fp32, so it computes what the GPU does up to the order
of the sums.

`slot` (and window_start) are read inside the kernels and SPLIT depends only on (B, Hkv, kv_len), so
a call never synchronises with the host and can be captured in a CUDA graph per kv_len.
"""

from __future__ import annotations

import contextlib

import torch

from ._triton import cdiv, interpreting, jit, next_power_of_2, resolve_impl, tl
from .decode_ref import (
    Prefix,
    attended_slots,
    check_decode_inputs,
    check_triton_dtypes,
    decode_attention_ref,
    window_start,
    with_prefix,
)
from .prefix_attention import PrefixRows, prefix_split_size
from .prefix_attention import prefix_split as prefix_attention_split

__all__ = ["Prefix", "attended_slots", "decode_attention", "decode_attention_ref", "split_size", "with_prefix"]

_NEG = -1.0e30  # running max of a split that saw no slot: finite, so exp(_NEG - M) is 0, never NaN
_BLOCK_S = 64  # slots per tile
_TARGET_PROGRAMS = 4 * 132  # split programs aimed for: about four waves of an H100's 132 SMs
_MAX_SPLITS = 64  # the combine step holds all of a head's splits in one [SPLITS, Dh] tile
_MAX_PREFIX_SPLITS = 16  # of those, the shared prefix's in a cascade
# A cascade's prefix part aims at one wave (it runs before or beside the own part, which fills the
# GPU; each split adds a record per query to merge): on an H100 at Qwen2.5-1.5B shapes 512 rows x 256
# prefix slots ran 1.13x faster in one split than in four, 64 x 2048 1.2x in eight than in sixteen.
_PREFIX_TARGET_PROGRAMS = 132

# The tile loop is software-pipelined (the next tiles' keys and values are copied to shared memory
# while this one is computed). Compiled for sm_90 at Qwen2.5-1.5B shapes (ptxas -v): 117 registers a
# thread at 4 warps, 39 KB of shared memory, 16 warps an SM resident; the unpipelined loop held the
# tiles in registers (158: 12 warps an SM). With a prefix the per-slot address select costs
# registers (182 at 4 warps: 8 warps an SM), so that variant launches 8 warps (118: 16 an SM).
_LOOP_STAGES = 2
_PREFIX_WARPS = 8

# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
# ----------------------------------------------------------------------------------------------


@jit
def _decode_split_kernel(
    q_ptr,  # (B, H, Dh)
    k_ptr,  # (B, HKV, S_max, Dh): slots [prefix_len, ...) of each row
    v_ptr,  # (B, HKV, S_max, Dh)
    pk_ptr,  # (P, HKV, prefix_len, Dh) shared prefix keys (k_ptr when there is none)
    pv_ptr,  # (P, HKV, prefix_len, Dh)
    group_ptr,  # (B,) int64: the prefix row of each row (read only if HAS_PREFIX)
    mask_ptr,  # (B, >= kv_len) int: 0 = pad key
    slot_ptr,  # (1,) int: the query's slot
    window_start_ptr,  # (B,) int32: the first slot each row's window admits (read only if HAS_WINDOW)
    out_ptr,  # (B, H, Dh): written only if DIRECT
    acc_ptr,  # (B, H, SPLITS, Dh) fp32 workspace: unnormalised sums (unless DIRECT)
    m_ptr,  # (B, H, SPLITS) fp32: running max per split
    l_ptr,  # (B, H, SPLITS) fp32: sum of exp(score - m) per split
    kv_len,
    prefix_len,
    scale,
    H,
    first_slot,  # the splits cover slots [first_slot, kv_len) (the prefix's end in a cascade)
    SPLIT,
    SPLITS,  # records per (row, head) in the workspace
    first_split,  # this launch writes records [first_split, first_split + its splits) (or merges those before)
    stride_q_b,
    stride_q_h,
    stride_q_d,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_k_d,
    stride_v_b,
    stride_v_h,
    stride_v_s,
    stride_v_d,
    stride_pk_b,
    stride_pk_h,
    stride_pk_s,
    stride_pk_d,
    stride_pv_b,
    stride_pv_h,
    stride_pv_s,
    stride_pv_d,
    stride_m_b,
    stride_m_s,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    G: tl.constexpr,  # query heads per kv head
    DH: tl.constexpr,  # head dim (fixed per model: a constant, so Dh = DH_PAD needs no channel mask)
    HAS_PREFIX: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: normalise and write out here, no combine step
    MERGED: tl.constexpr,  # DIRECT in a cascade: the prefix's records to merge first (else 0)
    DOT_F32: tl.constexpr,  # dots in full fp32 (not tf32): fp32 inputs, or the interpreter (below)
    G_PAD: tl.constexpr,
    DH_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    LOOP_STAGES: tl.constexpr,  # tiles in flight (1: no pipelining)
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    s = tl.program_id(2)
    slot = tl.load(slot_ptr).to(tl.int32)
    rows = tl.arange(0, G_PAD)
    heads = g * G + rows  # (G_PAD,) query heads of kv head g
    row_ok = rows < G
    d = tl.arange(0, DH_PAD)
    d_ok = d < DH
    q = tl.load(
        q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :] * stride_q_d,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (G_PAD, DH_PAD)

    start = first_slot + s * SPLIT
    hi = tl.minimum(tl.minimum(start + SPLIT, kv_len), slot + 1)  # past `slot` is the future
    lo = start
    if HAS_WINDOW:  # skip whole tiles before the window (tiles stay aligned to the split start)
        win_lo = tl.load(window_start_ptr + b)
        lo = tl.maximum(start, start + ((win_lo - start) // BLOCK_S) * BLOCK_S)

    m_i = tl.full((G_PAD,), -1.0e30, dtype=tl.float32)  # = _NEG
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, DH_PAD), dtype=tl.float32)
    k_base = k_ptr + b * stride_k_b + g.to(tl.int64) * stride_k_h  # column 0 holds slot prefix_len
    v_base = v_ptr + b * stride_v_b + g.to(tl.int64) * stride_v_h
    if HAS_PREFIX:
        prefix_row = tl.load(group_ptr + b).to(tl.int64)
        pk_base = pk_ptr + prefix_row * stride_pk_b + g.to(tl.int64) * stride_pk_h
        pv_base = pv_ptr + prefix_row * stride_pv_b + g.to(tl.int64) * stride_pv_h
    for j0 in tl.range(lo, hi, BLOCK_S, num_stages=LOOP_STAGES):  # a for: the compiler pipelines it
        j = j0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) slots of this tile
        in_range = j < hi
        real = tl.load(mask_ptr + b * stride_m_b + j * stride_m_s, mask=in_range, other=0) != 0
        ok = in_range & (real | (j == slot))
        if HAS_WINDOW:
            ok = ok & (j >= win_lo)
        kv_mask = ok[:, None] & d_ok[None, :]
        col = j - prefix_len  # (BLOCK_S,) the slots' columns in the row's own cache
        k_ptrs = k_base + col[:, None] * stride_k_s + d[None, :] * stride_k_d
        v_ptrs = v_base + col[:, None] * stride_v_s + d[None, :] * stride_v_d
        if HAS_PREFIX:  # a slot in the prefix is read there
            shared = (j < prefix_len)[:, None]
            k_ptrs = tl.where(shared, pk_base + j[:, None] * stride_pk_s + d[None, :] * stride_pk_d, k_ptrs)
            v_ptrs = tl.where(shared, pv_base + j[:, None] * stride_pv_s + d[None, :] * stride_pv_d, v_ptrs)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if DOT_F32:
            kt = tl.trans(k.to(tl.float32))
            scores = tl.dot(q.to(tl.float32), kt, input_precision="ieee")  # (G_PAD, BLOCK_S) fp32
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # stays -1e30 (finite) on an all-masked tile
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])  # masked slots: exp(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_in = p.to(v.dtype)  # p rounded to the cache dtype for the second dot (no-op in fp32)
        if DOT_F32:
            pv = tl.dot(p_in.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_in, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    heads64 = heads.to(tl.int64)
    if MERGED > 0:  # a cascade's prefix records [0, MERGED) of these heads, merged here
        for r in range(0, MERGED):
            rec = (b * H + heads64) * SPLITS + r  # (G_PAD,)
            m_r = tl.load(m_ptr + rec, mask=row_ok, other=-1.0e30)
            l_r = tl.load(l_ptr + rec, mask=row_ok, other=0.0)
            acc_r = tl.load(acc_ptr + rec[:, None] * DH + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m_i, m_r)
            alpha = tl.exp(m_i - m_new)
            beta = tl.exp(m_r - m_new)  # an empty record: exp(-1e30 - m_new) = 0 (or l_r = 0)
            l_i = l_i * alpha + l_r * beta
            acc = acc * alpha[:, None] + acc_r * beta[:, None]
            m_i = m_new
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_off = b * stride_o_b + heads64[:, None] * stride_o_h + d[None, :] * stride_o_d
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        rec = (b * H + heads64) * SPLITS + first_split + s  # (G_PAD,) flat (b, h, s)
        tl.store(m_ptr + rec, m_i, mask=row_ok)
        tl.store(l_ptr + rec, l_i, mask=row_ok)
        tl.store(acc_ptr + rec[:, None] * DH + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@jit
def _decode_combine_kernel(
    acc_ptr,  # (B, H, SPLITS, Dh) fp32
    m_ptr,  # (B, H, SPLITS) fp32
    l_ptr,  # (B, H, SPLITS) fp32
    out_ptr,  # (B, H, Dh)
    H,
    SPLITS,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    DH: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    DH_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    s_ok = sp < SPLITS
    d = tl.arange(0, DH_PAD)
    d_ok = d < DH
    rec = (b * H + h) * SPLITS + sp  # (SPLITS_PAD,)
    m = tl.load(m_ptr + rec, mask=s_ok, other=-1.0e30)  # = _NEG
    denom = tl.load(l_ptr + rec, mask=s_ok, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # (SPLITS_PAD,) empty and padded splits: 0 (or denom 0)
    total = tl.sum(w * denom, axis=0)
    acc = tl.load(acc_ptr + rec[:, None] * DH + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)  # (DH_PAD,)
    o_off = b * stride_o_b + h * stride_o_h + d * stride_o_d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _fork_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The device's second stream, made to wait for the current one (None off CUDA): a cascade's
    prefix part runs on it beside the own part, joined before the combine step (inside a CUDA-graph
    capture: two parallel branches)."""
    if device.type != "cuda":
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side = _SIDE_STREAMS[device]
    side.wait_stream(torch.cuda.current_stream(device))  # q and this step's cache writes come first
    return side


def split_size(batch: int, n_kv_heads: int, kv_len: int, block_s: int = _BLOCK_S, max_splits: int = _MAX_SPLITS) -> int:
    """Slots per split (a multiple of block_s): enough splits for ~_TARGET_PROGRAMS programs in all,
    at most one per tile and at most max_splits. Depends on python ints only (no device values)."""
    tiles = cdiv(max(kv_len, 1), block_s)
    wanted = cdiv(_TARGET_PROGRAMS, batch * n_kv_heads)
    splits = max(1, min(wanted, tiles, max_splits))
    return cdiv(tiles, splits) * block_s


def _decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    slot: torch.Tensor,
    kv_len: int,
    window: int | None,
    scale: float,
    prefix: Prefix | None = None,
    rows: PrefixRows | None = None,
    *,
    split: int | None = None,
    prefix_split: int | None = None,
    block_s: int = _BLOCK_S,
    num_warps: int | None = None,
    loop_stages: int = _LOOP_STAGES,
    concurrent: bool | None = None,
    prefix_launch: dict | None = None,
) -> torch.Tensor:
    """Launch the split and (with more than one split) combine kernels; with a prefix and its
    `rows`, the prefix part runs per group (prefix_attention.py) and the split kernel covers the
    rows' own slots: beside it on a second CUDA stream when the combine step follows anyway.
    split / prefix_split / block_s / num_warps / loop_stages / concurrent, and the prefix kernel's
    `prefix_launch` (loop_stages, num_warps, rows_per_prog): overrides (tests, tuning)."""
    B, H, Dh = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    if key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)
    k_prefix, v_prefix, group = (k_cache, v_cache, slot) if prefix is None else prefix  # placeholders: never read
    win_lo = slot if window is None else window_start(key_mask, slot, kv_len, window)  # (B,) int32 (or unread)
    prefix_len = 0 if prefix is None else k_prefix.shape[2]
    cascade = rows is not None and prefix_len > 0
    first_slot = prefix_len if cascade else 0
    first_split = 0
    if cascade:
        prefix_split = prefix_split or prefix_split_size(
            k_prefix, rows, H, target=_PREFIX_TARGET_PROGRAMS, max_splits=_MAX_PREFIX_SPLITS, block_s=block_s
        )
        if prefix_split % block_s:
            raise ValueError(f"prefix_split {prefix_split} is not a multiple of block_s {block_s}")
        first_split = cdiv(prefix_len, prefix_split)
    own_len = kv_len - first_slot
    if split is None:
        split = split_size(B, Hkv, own_len, block_s, _MAX_SPLITS - first_split)
    if split % block_s:
        raise ValueError(f"split {split} is not a multiple of block_s {block_s}")
    splits = cdiv(max(own_len, 1), split)
    total = first_split + splits
    if total > _MAX_SPLITS:
        raise ValueError(f"{total} splits (split {split}, prefix_split {prefix_split}) > {_MAX_SPLITS}")
    out = torch.empty((B, H, Dh), dtype=q.dtype, device=q.device)
    direct = splits == 1  # the split kernel writes out: no own records, no combine launch
    work = max(first_split, 1) if direct else total  # the prefix's records (a placeholder if none)
    acc = torch.empty((B, H, work, Dh), dtype=torch.float32, device=q.device)
    m = torch.empty((B, H, work), dtype=torch.float32, device=q.device)
    denom = torch.empty((B, H, work), dtype=torch.float32, device=q.device)
    dh_pad = max(16, next_power_of_2(Dh))
    dot_f32 = q.dtype == torch.float32 or interpreting()
    side = None  # the prefix part's stream when it runs beside the own part (one own split merges it: after)
    if cascade and not direct and concurrent is not False:
        side = _fork_stream(q.device)
    if cascade:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            prefix_attention_split(
                q, k_prefix, v_prefix, rows, key_mask, slot, None if window is None else win_lo, scale, acc, m, denom,
                split=prefix_split, block_s=block_s, dot_f32=dot_f32,
                **{"loop_stages": loop_stages, **(prefix_launch or {})},
            )  # fmt: skip
    shared = prefix is not None and not cascade  # the split kernel reads the prefix slot by slot
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, k_prefix, v_prefix, group, key_mask, slot, win_lo, out, acc, m, denom,
        kv_len, prefix_len, scale, H, first_slot, split, work, first_split,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2), k_prefix.stride(3),
        v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2), v_prefix.stride(3),
        key_mask.stride(0), key_mask.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        G=G, DH=Dh, HAS_PREFIX=shared, HAS_WINDOW=window is not None, DIRECT=direct,
        MERGED=first_split if direct else 0, DOT_F32=dot_f32,
        G_PAD=max(16, next_power_of_2(G)), DH_PAD=dh_pad, BLOCK_S=block_s, LOOP_STAGES=loop_stages,
        num_warps=num_warps or (_PREFIX_WARPS if shared else 4),
    )  # fmt: skip
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    if not direct:
        _decode_combine_kernel[(B, H)](
            acc, m, denom, out, H, total, out.stride(0), out.stride(1), out.stride(2),
            DH=Dh, SPLITS_PAD=next_power_of_2(total), DH_PAD=dh_pad, num_warps=4,
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    slot: torch.Tensor,
    kv_len: int,
    *,
    window: int | None = None,
    scale: float | None = None,
    prefix: Prefix | None = None,
    rows: PrefixRows | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of one query per row q (B, H, Dh) over cache slots [0, kv_len) -> (B, H, Dh).

    k_cache, v_cache: (B, Hkv, S_max, Dh), any strides (a layer of KVCache.k is fine); key_mask
    (B, >= kv_len) long or bool, 1 = real key; slot (1,) int device tensor; kv_len > slot (python
    int); window: attend the last `window` real keys (key_mask 1) up to and including the slot,
    pads inside a row not counted; scale: default Dh^-0.5. Inference only (no grad).
    prefix: (k_prefix, v_prefix (P, Hkv, Tp, Dh), group (B,) int64), the shared first Tp slots
    (module docstring); the caches then hold slots [Tp, Tp + S_max), and kv_len >= Tp.
    rows: the prefix's rows listed per prefix row (prefix_attention.prefix_rows of `group`): the
    prefix part then runs once per group (the same attention, computed in another order).
    impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "ref".
    """
    check_decode_inputs(q, k_cache, v_cache, key_mask, slot, kv_len, window, prefix, rows)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    path = resolve_impl(impl, q, k_cache, v_cache, key_mask, slot, *(prefix or ()), *(rows[:3] if rows else ()))
    if path == "ref" or q.numel() == 0:
        return decode_attention_ref(q, k_cache, v_cache, key_mask, slot, kv_len, window, scale, prefix)
    check_triton_dtypes(q, k_cache, v_cache, prefix)
    return _decode_attention_triton(q, k_cache, v_cache, key_mask, slot, kv_len, window, scale, prefix, rows)
