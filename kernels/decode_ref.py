"""Decode attention in torch: which slots a query attends, the reference, and the input checks.

The spec of flash_decode.py's kernels (and their CPU fallback). Slot j of row b is attended by the
query at `slot` iff

    j <= slot  and  key_mask[b, j] != 0  and  (window is None or count[b, j] > count[b, slot] - window),

or j == slot (the query's own slot, so no row is ever fully masked), where count[b, j] is the number
of real keys (key_mask 1) in slots [0, j]. The sliding window counts real tokens, not slots: pads
inside a row (a turn cache's history, pads, then the new turn) do not push real keys out of it, so a
row attends exactly as it would with its pads removed (models/transformer.py's attention_mask_4d).

Since count is non-decreasing along a row, the real keys the window admits are those at or after
one slot, `window_start` (B,): the kernels compare j >= window_start[b], computed here on the device
from the key mask and the slot tensor (no host synchronisation, so a CUDA graph can capture it).
"""

from __future__ import annotations

import torch

Prefix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # k, v (P, Hkv, Tp, Dh) and group (B,) int64


def real_key_count(key_mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, kv_len) int32: real keys in slots [0, j] of each row."""
    return (key_mask[:, :kv_len] != 0).cumsum(-1, dtype=torch.int32)  # (B, S)


def window_start(key_mask: torch.Tensor, slot: torch.Tensor, kv_len: int, window: int) -> torch.Tensor:
    """(B,) int32 on key_mask's device: the first slot whose real key the window of the query at
    `slot` admits. A real key j is in the window iff count[j] > count[slot] - window, and count is
    non-decreasing, so the slots with count[j] <= count[slot] - window are exactly [0, start)."""
    count = real_key_count(key_mask, kv_len)  # (B, S)
    at_slot = count.index_select(1, slot.view(1).to(key_mask.device))  # (B, 1): real keys up to the query
    return (count <= at_slot - window).sum(-1, dtype=torch.int32)  # (B,)


def attended_slots(key_mask: torch.Tensor, slot: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """(B, kv_len) bool: the slots the query at `slot` attends (the module docstring's rule)."""
    j = torch.arange(kv_len, device=key_mask.device).view(1, -1)  # (1, S)
    q = slot.view(-1, 1).to(key_mask.device)  # (1, 1)
    allowed = (j <= q) & key_mask[:, :kv_len].bool()  # (B, S)
    if window is not None:
        count = real_key_count(key_mask, kv_len)  # (B, S)
        at_slot = count.gather(1, q.expand(count.shape[0], 1))  # (B, 1)
        allowed = allowed & (count > at_slot - window)
    return allowed | (j == q)


def with_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, prefix: Prefix | None, kv_len: int):
    """Slots [0, kv_len) of every row as plain (B, Hkv, kv_len, Dh) tensors: the rows' prefix (a
    gathered copy) followed by their own cache; without a prefix, views of the caches."""
    if prefix is None:
        return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    k_prefix, v_prefix, group = prefix
    own = kv_len - k_prefix.shape[2]
    k = torch.cat([k_prefix.index_select(0, group), k_cache[:, :, :own]], dim=2)  # (B, Hkv, kv_len, Dh)
    v = torch.cat([v_prefix.index_select(0, group), v_cache[:, :, :own]], dim=2)
    return k, v


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    slot: torch.Tensor,
    kv_len: int,
    window: int | None = None,
    scale: float | None = None,
    prefix: Prefix | None = None,
) -> torch.Tensor:
    """The spec in torch: fp32 math (fp64 for fp64 inputs), out (B, H, Dh) in q.dtype."""
    B, H, Dh = q.shape
    Hkv = k_cache.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = Dh**-0.5 if scale is None else scale
    allowed = attended_slots(key_mask, slot, kv_len, window)[:, None, None, :]  # (B, 1, 1, S)
    qg = q.reshape(B, Hkv, H // Hkv, Dh).to(acc)  # (B, Hkv, G, Dh)
    k, v = with_prefix(k_cache, v_cache, prefix, kv_len)  # (B, Hkv, S, Dh) each
    k, v = k.to(acc), v.to(acc)
    scores = (qg @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, S); materializes (B, H, S) fp32
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    v = v.masked_fill(~allowed.transpose(-1, -2), 0.0)  # unattended slots add nothing, even inf / NaN
    return (p @ v).reshape(B, H, Dh).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Input checks (shapes and python values only: no host synchronisation)
# ----------------------------------------------------------------------------------------------


def _check_prefix(prefix: Prefix, rows, B: int, Hkv: int, Dh: int, kv_len: int) -> int:
    """Check the shared prefix (and its rows); returns its length Tp."""
    k_prefix, v_prefix, group = prefix
    if v_prefix.shape != k_prefix.shape or k_prefix.dim() != 4 or k_prefix.shape[1] != Hkv or k_prefix.shape[3] != Dh:
        raise ValueError(
            f"prefix k {tuple(k_prefix.shape)} and v {tuple(v_prefix.shape)} must both be (P, {Hkv}, Tp, {Dh})"
        )
    if group.shape != (B,) or group.dtype != torch.int64:
        raise ValueError(f"prefix group must be ({B},) int64, got {tuple(group.shape)} {group.dtype}")
    first = k_prefix.shape[2]
    if first > kv_len:
        raise ValueError(f"kv_len {kv_len} ends inside the {first}-slot prefix")
    if rows is not None:
        P = k_prefix.shape[0]
        if rows.order.shape != (B,) or rows.start.shape != (P,) or rows.count.shape != (P,):
            raise ValueError(
                f"rows: order {tuple(rows.order.shape)}, start {tuple(rows.start.shape)} and count "
                f"{tuple(rows.count.shape)} must be ({B},), ({P},), ({P},) for {B} rows over {P} prefix rows"
            )
    return first


def check_decode_inputs(q, k_cache, v_cache, key_mask, slot, kv_len, window, prefix, rows) -> None:
    """Raise ValueError naming the first bad argument of decode_attention."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be (B, H, Dh) and k_cache (B, Hkv, S_max, Dh), got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}")  # fmt: skip
    B, H, Dh = q.shape
    Hkv = k_cache.shape[1]
    if k_cache.shape[0] != B or k_cache.shape[3] != Dh or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be ({B}, Hkv, S_max, {Dh}) "
            f"for q {tuple(q.shape)}"
        )
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if rows is not None and prefix is None:
        raise ValueError("rows were given without a prefix")
    first = 0 if prefix is None else _check_prefix(prefix, rows, B, Hkv, Dh, kv_len)
    if not 1 <= kv_len <= first + k_cache.shape[2]:
        raise ValueError(f"kv_len {kv_len} must be in [1, {first + k_cache.shape[2]}] (cache slots {first} + "
                         f"{k_cache.shape[2]})")  # fmt: skip
    if key_mask.dim() != 2 or key_mask.shape[0] != B or key_mask.shape[1] < kv_len:
        raise ValueError(f"key_mask {tuple(key_mask.shape)} must be ({B}, >= kv_len {kv_len})")
    if slot.numel() != 1 or slot.dtype.is_floating_point:
        raise ValueError(f"slot must be one integer index, got {tuple(slot.shape)} {slot.dtype}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")


def check_triton_dtypes(q, k_cache, v_cache, prefix) -> None:
    """Raise ValueError where the kernels cannot read the tensors' dtypes."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"no Triton decode attention for {q.dtype} (fp16, bf16, fp32); use impl='ref'")
    if not k_cache.dtype == v_cache.dtype == q.dtype:
        raise ValueError(f"q {q.dtype}, k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must share one dtype")
    if prefix is not None and not prefix[0].dtype == prefix[1].dtype == q.dtype:
        raise ValueError(f"prefix {prefix[0].dtype} / {prefix[1].dtype} must have q's dtype {q.dtype}")
