"""Decode attention over a shared prefix, once per group of rows ("cascade" attention).

GRPO decodes G completions of each prompt side by side. Their first Tp slots (the prompt) are one
shared prefix row (flash_decode.py, `prefix`), yet the per-row kernel still loads each prefix tile
once per row: from L2, so the bytes come from HBM once, but the SMs' load path carries them G
times, and the G x (query heads per kv head) queries of a group go through the tensor cores in
16-row tiles mostly made of padding. Here one program takes every query of a group that reads
kv head g -- R rows x G heads (8 x 6 = 48 for Qwen2.5-1.5B) -- as one [R*G, Dh] tile against each
prefix tile: the prefix is loaded once per group and the dots are full tensor-core tiles.

    prefix_split(q (B, H, Dh), k_prefix, v_prefix (P, Hkv, Tp, Dh), rows: PrefixRows, key_mask,
                 slot, window, scale, acc, m, l (the split workspace), split)

writes, for every row b and query head h, the partial softmax (acc, m, l) of slots
[s*split, min((s+1)*split, Tp)) at split record s of (b, h); the rows' own slots are split records
after those (flash_decode.py), and flash_decode's combine step merges them all. Which slots a
query attends is exactly flash_decode's rule (j <= slot, key_mask[b, j] or j == slot, and with a
window j >= window_start[b], decode_ref.py): the mask and the window's start are read per row, so
rows of one group may differ in them.

`PrefixRows` lists the rows of each prefix row (rows order[start[p] : start[p] + count[p]]),
built on the device from `group` without a host sync, so it can be rebuilt after rows are
dropped and read inside a captured CUDA graph. `max_rows`, a python int bounding every count (the
group size G), fixes the grid: a group larger than one tile's rows is cut into several programs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton import cdiv, jit, next_power_of_2, tl

_MAX_QUERIES = 128  # query rows of one program's tile (rows x padded heads)


class PrefixRows(NamedTuple):
    """The rows of each prefix row: rows order[start[p] : start[p] + count[p]] read prefix row p."""

    order: torch.Tensor  # (B,) int64: the rows sorted by prefix row
    start: torch.Tensor  # (P,) int64
    count: torch.Tensor  # (P,) int64
    max_rows: int  # >= every count: the grid's rows per prefix row


def prefix_rows(group: torch.Tensor, n_prefix: int, max_rows: int) -> PrefixRows:
    """PrefixRows of `group` (B,) int64 (the prefix row of each row) over n_prefix prefix rows;
    device ops only (no host sync). max_rows must bound the rows of any prefix row."""
    order = torch.sort(group, stable=True).indices  # (B,)
    count = torch.zeros(n_prefix, dtype=torch.int64, device=group.device)
    count.scatter_add_(0, group, torch.ones_like(group))  # (P,)
    return PrefixRows(order, count.cumsum(0) - count, count, max_rows)


def rows_per_program(max_rows: int, n_heads_per_kv: int) -> int:
    """Rows of one program's query tile: a power of two with rows x padded heads <= _MAX_QUERIES."""
    heads = next_power_of_2(n_heads_per_kv)
    return max(1, min(next_power_of_2(max(max_rows, 1)), _MAX_QUERIES // heads))


@jit
def _prefix_split_kernel(
    q_ptr,  # (B, H, Dh)
    pk_ptr,  # (P, HKV, Tp, Dh) shared prefix keys
    pv_ptr,  # (P, HKV, Tp, Dh)
    order_ptr,  # (B,) int64: rows sorted by prefix row
    start_ptr,  # (P,) int64: first entry of each prefix row in order
    count_ptr,  # (P,) int64: rows of each prefix row
    mask_ptr,  # (B, >= kv_len) int: 0 = pad key
    slot_ptr,  # (1,) int: the query's slot
    window_start_ptr,  # (B,) int32: the first slot each row's window admits (read only if HAS_WINDOW)
    acc_ptr,  # (B, H, SPLITS, Dh) fp32 workspace: unnormalised sums
    m_ptr,  # (B, H, SPLITS) fp32: running max per split
    l_ptr,  # (B, H, SPLITS) fp32: sum of exp(score - m) per split
    prefix_len,
    scale,
    H,
    SPLIT,
    SPLITS,  # records per (row, head) in the workspace; this kernel writes the first ones
    CHUNKS,  # programs per prefix row (ROWS rows each)
    stride_q_b,
    stride_q_h,
    stride_q_d,
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
    G: tl.constexpr,  # query heads per kv head
    DH: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,  # dots in full fp32: fp32 inputs, or the interpreter (flash_decode.py)
    ROWS: tl.constexpr,  # rows of the tile (a power of two)
    G_PAD: tl.constexpr,  # heads of the tile per row (a power of two >= G)
    DH_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    pc = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    p = (pc // CHUNKS).to(tl.int64)
    first_row = (pc % CHUNKS) * ROWS  # of this prefix row's rows
    n_rows = tl.load(count_ptr + p)
    listed = tl.load(start_ptr + p)
    slot = tl.load(slot_ptr).to(tl.int32)

    ri = tl.arange(0, ROWS)
    r_ok = first_row + ri < n_rows
    b_r = tl.load(order_ptr + listed + first_row + ri, mask=r_ok, other=0).to(tl.int64)  # (ROWS,) the rows
    qi = tl.arange(0, ROWS * G_PAD)  # tile row = (row r, head hh) as r * G_PAD + hh
    r = qi // G_PAD
    hh = qi % G_PAD
    q_ok = (hh < G) & (first_row + r < n_rows)
    b = tl.load(order_ptr + listed + first_row + r, mask=q_ok, other=0).to(tl.int64)  # (QP,) row per tile row
    head = (g * G + hh).to(tl.int64)
    d = tl.arange(0, DH_PAD)
    d_ok = d < DH
    q = tl.load(
        q_ptr + b[:, None] * stride_q_b + head[:, None] * stride_q_h + d[None, :] * stride_q_d,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (QP, DH_PAD)

    lo = s * SPLIT
    hi = tl.minimum(tl.minimum(lo + SPLIT, prefix_len), slot + 1)
    hi = tl.where(first_row < n_rows, hi, lo)  # a program past this prefix row's rows: no tiles
    if HAS_WINDOW:  # skip the tiles before every row's window
        win_lo = tl.load(window_start_ptr + b_r, mask=r_ok, other=0)  # (ROWS,)
        first_in = tl.min(tl.where(r_ok, win_lo, prefix_len), axis=0)
        lo = tl.maximum(lo, lo + ((first_in - lo) // BLOCK_S) * BLOCK_S)

    m_i = tl.full((ROWS * G_PAD,), -1.0e30, dtype=tl.float32)  # flash_decode's _NEG
    l_i = tl.zeros((ROWS * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((ROWS * G_PAD, DH_PAD), dtype=tl.float32)
    pk_base = pk_ptr + p * stride_pk_b + g.to(tl.int64) * stride_pk_h
    pv_base = pv_ptr + p * stride_pv_b + g.to(tl.int64) * stride_pv_h
    for j0 in tl.range(lo, hi, BLOCK_S, num_stages=LOOP_STAGES):
        j = j0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
        in_range = j < hi
        real = tl.load(
            mask_ptr + b_r[:, None] * stride_m_b + j[None, :] * stride_m_s,
            mask=r_ok[:, None] & in_range[None, :],
            other=0,
        )  # (ROWS, BLOCK_S): each row's own key mask
        ok_r = in_range[None, :] & ((real != 0) | (j == slot)[None, :]) & r_ok[:, None]
        if HAS_WINDOW:
            ok_r = ok_r & (j[None, :] >= win_lo[:, None])
        ok_r = ok_r.to(tl.int32)
        read = (tl.max(ok_r, axis=0) > 0)[:, None] & d_ok[None, :]  # slots some row attends
        ok = tl.reshape(tl.broadcast_to(ok_r[:, None, :], (ROWS, G_PAD, BLOCK_S)), (ROWS * G_PAD, BLOCK_S)) != 0
        k = tl.load(pk_base + j[:, None] * stride_pk_s + d[None, :] * stride_pk_d, mask=read, other=0.0)
        v = tl.load(pv_base + j[:, None] * stride_pv_s + d[None, :] * stride_pv_d, mask=read, other=0.0)
        if DOT_F32:
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))  # (QP, BLOCK_S) fp32
        scores = tl.where(ok, scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(scores - m_new[:, None])  # masked slots: exp(-inf) = 0
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        p_in = probs.to(v.dtype)
        if DOT_F32:
            pv = tl.dot(p_in.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_in, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    rec = (b * H + head) * SPLITS + s  # (QP,) flat (b, h, s)
    tl.store(m_ptr + rec, m_i, mask=q_ok)
    tl.store(l_ptr + rec, l_i, mask=q_ok)
    tl.store(acc_ptr + rec[:, None] * DH + d[None, :], acc, mask=q_ok[:, None] & d_ok[None, :])


def prefix_split_size(k_prefix: torch.Tensor, rows: PrefixRows, n_heads: int, *, target: int, max_splits: int,
                      block_s: int) -> int:  # fmt: skip
    """Slots per prefix split (a multiple of block_s): at most `target` programs in all (but at
    least one split), at most one split per tile and at most max_splits. Shapes and python ints
    only (CUDA-graph safe)."""
    P, Hkv, Tp, _ = k_prefix.shape
    chunks = cdiv(max(rows.max_rows, 1), rows_per_program(rows.max_rows, n_heads // Hkv))
    tiles = cdiv(max(Tp, 1), block_s)
    splits = max(1, min(target // (P * Hkv * chunks), tiles, max_splits))
    return cdiv(tiles, splits) * block_s


def prefix_split(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    rows: PrefixRows,
    key_mask: torch.Tensor,
    slot: torch.Tensor,
    window_start: torch.Tensor | None,
    scale: float,
    acc: torch.Tensor,
    m: torch.Tensor,
    denom: torch.Tensor,
    *,
    split: int,
    block_s: int,
    dot_f32: bool,
    loop_stages: int,
    num_warps: int | None = None,
    rows_per_prog: int | None = None,
) -> None:
    """Launch the prefix kernel into split records [0, cdiv(Tp, split)) of the workspace (acc, m,
    denom: (B, H, SPLITS[, Dh])). window_start: (B,) int32, the first slot each row's sliding window
    admits (decode_ref.window_start), or None without a window. num_warps / rows_per_prog: overrides
    (tuning)."""
    _, H, Dh = q.shape
    P, Hkv, Tp, _ = k_prefix.shape
    G = H // Hkv
    n_rows = rows_per_prog or rows_per_program(rows.max_rows, G)
    chunks = cdiv(max(rows.max_rows, 1), n_rows)
    splits = cdiv(max(Tp, 1), split)
    g_pad = next_power_of_2(G)
    queries = n_rows * g_pad
    if queries < 16:  # tl.dot wants >= 16 tile rows: pad the heads
        g_pad *= 16 // queries
    _prefix_split_kernel[(P * chunks, Hkv, splits)](
        q, k_prefix, v_prefix, rows.order, rows.start, rows.count, key_mask, slot,
        slot if window_start is None else window_start, acc, m, denom, Tp, scale, H, split, m.shape[2], chunks,
        q.stride(0), q.stride(1), q.stride(2),
        k_prefix.stride(0), k_prefix.stride(1), k_prefix.stride(2), k_prefix.stride(3),
        v_prefix.stride(0), v_prefix.stride(1), v_prefix.stride(2), v_prefix.stride(3),
        key_mask.stride(0), key_mask.stride(1),
        G=G, DH=Dh, HAS_WINDOW=window_start is not None, DOT_F32=dot_f32, ROWS=n_rows, G_PAD=g_pad,
        DH_PAD=max(16, next_power_of_2(Dh)), BLOCK_S=block_s, LOOP_STAGES=loop_stages,
        num_warps=num_warps or (8 if n_rows * g_pad >= 64 else 4),
    )  # fmt: skip
